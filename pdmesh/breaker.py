"""The circuit breaker (closed -> open -> half-open -> closed) of every pdmesh client of a peer: the router's
per-worker legs and the tier server's remote tier (Redis or the cache server).

Contract:
- closed: every attempt allowed; ``failures`` consecutive failures open it.
- open: no attempt allowed until ``open_s`` passed; each reopen doubles the interval, capped at ``max_open_s``
  (``max_open_s == open_s`` gives a constant cooldown).
- half-open (open interval over): exactly one trial attempt is allowed (``try_acquire`` claims it); its success
  closes the breaker and resets the interval, its failure reopens it. A trial that ends without a verdict must
  be handed back with ``release_trial``.
- ``trip()`` opens immediately (a refused connection is unambiguous).
Cheap and thread-safe (one uncontended lock): the router calls it on its event loop for every attempt, the tier
server from I/O threads. Time comes from an injectable clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass
class CircuitBreaker:
    failures: int = 3
    open_s: float = 5.0
    max_open_s: float = 60.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    consecutive_failures: int = 0
    opened_until: float = 0.0
    reopen_count: int = 0
    _trial_in_flight: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def state(self) -> State:
        if self.opened_until == 0.0:
            return "closed"
        return "open" if self.clock() < self.opened_until else "half_open"

    @property
    def is_open(self) -> bool:
        return self.state == "open"

    def allows(self) -> bool:
        """Would an attempt be allowed now (without claiming the half-open trial)?"""
        st = self.state
        return st == "closed" or (st == "half_open" and not self._trial_in_flight)

    def try_acquire(self) -> bool:
        """Claim the right to send one attempt; in half-open only one caller gets it until it reports."""
        with self._lock:
            st = self.state
            if st == "closed":
                return True
            if st == "half_open" and not self._trial_in_flight:
                self._trial_in_flight = True
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self.consecutive_failures = 0
            self.opened_until = 0.0
            self.reopen_count = 0
            self._trial_in_flight = False

    def record_failure(self) -> None:
        with self._lock:
            self.consecutive_failures += 1
            if self.state == "half_open" or self.consecutive_failures >= self.failures:
                self._open()

    def trip(self) -> None:
        with self._lock:
            self.consecutive_failures = max(self.consecutive_failures + 1, self.failures)
            self._open()

    def release_trial(self) -> None:
        """The trial attempt ended without a verdict (e.g. cancelled): let another one try."""
        with self._lock:
            self._trial_in_flight = False

    def _open(self) -> None:
        interval = min(self.open_s * (2**self.reopen_count), max(self.max_open_s, self.open_s))
        self.reopen_count += 1
        self.opened_until = self.clock() + interval
        self._trial_in_flight = False
