"""The one restart policy of every supervisor: when a dead child is started again, and when that is given up.

Four supervisors keep children running, each with its policy as a named constant beside it: the worker's
``TierWatch`` and ``EngineWatch`` (:mod:`pdmesh.worker.supervision`), the router's multi-process parent
(:mod:`pdmesh.router.processes`) and ``pdmesh up`` (:meth:`pdmesh.cluster.LocalCluster.supervise`). Each keeps one
:class:`RestartTracker` per child and does the I/O itself (watching, spawning, logging); the tracker only
decides. It reads nothing but the clock it was given, so tests drive it with a fake one.

Contract (:class:`RestartPolicy`, :class:`RestartTracker`):

- A start *fails* when it could not spawn or never became ready (:meth:`RestartTracker.start_failed`), or when
  the child exits before it proved good: before :meth:`RestartTracker.healthy` since its start and, with
  ``quick_s`` set, sooner than ``quick_s`` after its start. A child that proved good and then exits is
  restarted at once and its backoff starts over.
- Backoff: after the k-th failed start in a row the restart waits :meth:`RestartPolicy.delay` (k) seconds: the
  first ``at_once`` ones none, then ``first_delay_s`` multiplied by ``factor`` each time, at most
  ``max_delay_s``.
- Crash loop: an exit or failed start raises :class:`CrashLoop` when more than ``max_exits`` of them (failed
  starts included) fall within ``window_s``, or when more than ``max_failed_starts`` starts failed in a row.
  ``None`` turns a rule off; with both off a child is restarted forever.

:func:`log_tail` (a child's last log lines, for the message that says why it died) is the one helper here that
reads a file.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class CrashLoop(RuntimeError):
    """A child exited or failed to start too often (its :class:`RestartPolicy`'s crash-loop rule): restarting it
    again would not help. The message names the child, the count and the last reason (and, where the supervisor
    passed them, the child's last log lines)."""


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a dead child and when to give up (the module docstring has the contract)."""

    first_delay_s: float = 1.0  # the wait after the first failed start in a row (after the ``at_once`` ones)
    max_delay_s: float = 30.0  # the longest wait
    factor: float = 2.0  # each failed start in a row multiplies the wait by this
    at_once: int = (
        0  # this many failed starts in a row are restarted without a wait before the backoff begins
    )
    max_exits: int | None = (
        None  # more exits (failed starts included) within window_s: CrashLoop; None: never
    )
    window_s: float = 60.0
    max_failed_starts: int | None = None  # more failed starts in a row: CrashLoop; None: never
    quick_s: float | None = (
        None  # an exit sooner than this after the start is a failed start (None: no time rule)
    )

    def __post_init__(self) -> None:
        if self.first_delay_s < 0 or self.max_delay_s < self.first_delay_s or self.factor < 1:
            raise ValueError(f"bad backoff: {self}")
        if self.at_once < 0 or self.window_s <= 0 or (self.quick_s is not None and self.quick_s <= 0):
            raise ValueError(f"bad restart policy: {self}")
        if (self.max_exits is not None and self.max_exits < 0) or (
            self.max_failed_starts is not None and self.max_failed_starts < 0
        ):
            raise ValueError(f"bad crash-loop rule: {self}")

    def delay(self, failures: int) -> float:
        """The wait before the restart after ``failures`` failed starts in a row (0 for none)."""
        k = failures - self.at_once
        if k <= 0:
            return 0.0
        delay = self.first_delay_s
        for _ in range(k - 1):  # stops at the cap: no overflow however long the run of failures
            if delay >= self.max_delay_s or delay == 0 or self.factor == 1:
                break
            delay *= self.factor
        return min(delay, self.max_delay_s)


class RestartTracker:
    """The restart state of one child under a :class:`RestartPolicy`. Not thread-safe: one supervisor owns it.

    The supervisor calls :meth:`started` when it spawns the child (the tracker starts as if it just had),
    :meth:`healthy` once that process proved ready (when it has a readiness check), :meth:`exited` once per death
    it sees and :meth:`start_failed` when a start attempt fails; it restarts the dead child once :meth:`due`.
    ``name`` is the child as the messages call it.
    """

    def __init__(
        self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic, name: str = "child"
    ):
        self.policy = policy
        self.name = name
        self._clock = clock
        self._exits: deque[tuple[float, bool]] = deque()  # (when, was a start_failed) within the window
        self._failures = 0  # failed starts in a row
        self._next_at = clock()
        self._started_at = clock()
        self._proven = False

    @property
    def failures_in_a_row(self) -> int:
        """Failed starts since the child last proved good."""
        return self._failures

    @property
    def next_delay(self) -> float:
        """The wait the next failed start would get."""
        return self.policy.delay(self._failures + 1)

    def wait_s(self) -> float:
        """Seconds until the restart is due (0 when it is)."""
        return max(0.0, self._next_at - self._clock())

    def due(self) -> bool:
        """Whether the dead child may be restarted now."""
        return self._clock() >= self._next_at

    def started(self) -> None:
        """A new process of the child was spawned now: it has not proved good yet."""
        self._started_at = self._clock()
        self._proven = False

    def healthy(self) -> None:
        """The current process passed its readiness check: its next exit restarts at once, backoff reset."""
        self._proven = True
        self._failures = 0

    def exited(self, reason: str = "", last_log: str | None = None) -> float:
        """The child's process was seen dead (call once per death). Returns the wait before its restart (0 if it
        had proved good, else the backoff of a failed start). Raises :class:`CrashLoop` (``reason`` and
        ``last_log`` go into its message) when the policy gives up."""
        now = self._clock()
        quick_s = self.policy.quick_s
        proven = self._proven or (quick_s is not None and now - self._started_at >= quick_s)
        self._failures = 0 if proven else self._failures + 1
        self._proven = False
        return self._count(now, False, reason, last_log)

    def start_failed(self, reason: str = "", last_log: str | None = None) -> float:
        """A start attempt failed (it could not spawn, or never became ready). Returns the wait before the next
        try; raises :class:`CrashLoop` like :meth:`exited`."""
        self._failures += 1
        self._proven = False
        return self._count(self._clock(), True, reason, last_log)

    def _count(self, now: float, failed_start: bool, reason: str, last_log: str | None) -> float:
        p = self.policy
        self._exits.append((now, failed_start))
        while self._exits and now - self._exits[0][0] >= p.window_s:
            self._exits.popleft()
        message = None
        if p.max_exits is not None and len(self._exits) > p.max_exits:
            verb = "exited or failed to start" if any(f for _, f in self._exits) else "exited"
            message = f"{self.name} {verb} {len(self._exits)} times within {p.window_s:.0f}s"
        elif p.max_failed_starts is not None and self._failures > p.max_failed_starts:
            message = f"{self.name} failed {self._failures} times in a row right after starting"
        if message is not None:
            message += f" ({reason}); giving up" if reason else "; giving up"
            if last_log is not None:
                message += f". Its last log lines:\n{last_log}"
            raise CrashLoop(message)
        delay = p.delay(self._failures)
        self._next_at = now + delay
        return delay


def log_tail(path: str | os.PathLike[str] | None, n: int = 20, max_bytes: int = 256 * 1024) -> str:
    """The last ``n`` lines of a child's log file (at most its last ``max_bytes``), or ``(no log)`` when there is
    no such file. Never raises OSError."""
    if path is None:
        return "(no log)"
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            data = f.read(max_bytes)
    except OSError:
        return "(no log)"
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes:
        lines = lines[1:]  # the first one is probably cut
    return "\n".join(lines[-n:]) if n > 0 else ""
