"""Admission control: token-bucket rate limits and concurrency limits, global and per API key.

Contract: :meth:`Limiter.admit` either returns a :class:`Permit` (the caller must ``release()`` it when the
response is finished, a stream included; release is idempotent) or raises :class:`OpenAIError` 429 with a
``Retry-After`` header (whole seconds, >= 1) and an OpenAI ``rate_limit_error`` body. Nothing waits: a request over
a limit is refused at once. Per-key state is bounded (at most ``max_keys`` keys are tracked; the idlest are
dropped).

Units: a request is admitted for as many units as the sequences it asks for (a batched completion's prompts times
``n``; :func:`router.openai_requests.request_parts`): each unit takes one concurrency slot (global and per key) and
one token of each rate bucket, exactly as that many single requests would. A permit is first taken for one unit
(before the body is read) and grown with :meth:`Permit.grow` once the body tells how many it needs. A request
needing more units than :attr:`Limiter.capacity` (the smallest concurrency limit or bucket burst that is set)
could never be admitted: it is a 400 ``too_many_parts``, not a 429 that a client would retry forever.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from pdmesh.router.config import LimitsConfig
from pdmesh.router.errors import OpenAIError


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    tokens: float = -1.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.stamp = self.clock()

    def take(self, n: float = 1.0) -> float:
        """Take ``n`` tokens (all or none); returns 0.0 on success, else the seconds until ``n`` are available
        (never, when ``n`` > ``burst``: callers keep ``n`` within it)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate_per_s


@dataclass
class _KeyState:
    bucket: TokenBucket | None
    in_flight: int = 0


class Permit:
    """One admitted request holding ``units`` units (see the module docstring) until :meth:`release`."""

    __slots__ = ("_done", "_key", "_limiter", "units")

    def __init__(self, limiter: Limiter, key: str, units: int = 1) -> None:
        self._limiter = limiter
        self._key = key
        self.units = units
        self._done = False

    def grow(self, extra: int) -> None:
        """Admit ``extra`` more units for the same request, all or none: raises as :meth:`Limiter.admit` does
        (400 when the request's units would pass :attr:`Limiter.capacity`, else 429), and the permit then still
        holds what it held (the caller releases it as usual)."""
        if extra <= 0:
            return
        if self._done:
            raise RuntimeError("a released permit cannot grow")
        self._limiter._take(self._key, extra, self.units + extra)
        self.units += extra

    def release(self) -> None:
        """Free every unit held (idempotent)."""
        if not self._done:
            self._done = True
            self._limiter._release(self._key, self.units)


def _too_many(message: str, retry_after_s: float, code: str) -> OpenAIError:
    secs = max(1, math.ceil(retry_after_s))
    return OpenAIError(429, message, code=code, headers={"Retry-After": str(secs)})


class Limiter:
    def __init__(
        self, cfg: LimitsConfig, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.max_keys = max_keys
        self.in_flight = 0
        self._global = (
            TokenBucket(cfg.rate_per_s, cfg.burst or max(1.0, cfg.rate_per_s), clock)
            if cfg.rate_per_s
            else None
        )
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()
        self.enabled = bool(
            cfg.max_concurrency or cfg.rate_per_s or cfg.per_key_max_concurrency or cfg.per_key_rate_per_s
        )

    def _key_state(self, key: str) -> _KeyState:
        st = self._keys.get(key)
        if st is None:
            c = self.cfg
            bucket = (
                TokenBucket(
                    c.per_key_rate_per_s, c.per_key_burst or max(1.0, c.per_key_rate_per_s), self.clock
                )
                if c.per_key_rate_per_s
                else None
            )
            st = self._keys[key] = _KeyState(bucket)
            if len(self._keys) > self.max_keys:
                for old, s in list(self._keys.items()):
                    if s.in_flight == 0 and old != key:
                        del self._keys[old]
                        break
        else:
            self._keys.move_to_end(key)
        return st

    @property
    def capacity(self) -> int | None:
        """The most units one request can ever hold: the smallest concurrency limit or rate-bucket burst that is
        set (None: no limit bounds it)."""
        c = self.cfg
        bounds = [c.max_concurrency, c.per_key_max_concurrency]
        if self._global is not None:
            bounds.append(int(self._global.burst))
        if c.per_key_rate_per_s:
            bounds.append(int(c.per_key_burst or max(1.0, c.per_key_rate_per_s)))
        set_bounds = [b for b in bounds if b]
        return min(set_bounds) if set_bounds else None

    def admit(self, key: str, units: int = 1) -> Permit:
        """Admit a request of API key ``key`` for ``units`` units or raise 400/429 (see module contract)."""
        self._take(key, units, units)
        return Permit(self, key, units)

    def _take(self, key: str, units: int, total: int) -> None:
        """Take ``units`` more units for a request that then holds ``total``: all or none."""
        c = self.cfg
        capacity = self.capacity
        if capacity is not None and total > capacity:
            raise OpenAIError(
                400,
                f"this request asks for {total} sequences (prompts x n); this router's admission limits admit at"
                f" most {capacity} at once",
                code="too_many_parts",
            )
        if c.max_concurrency and self.in_flight + units > c.max_concurrency:
            raise _too_many("too many concurrent requests on this router", 1, "concurrency_limit_exceeded")
        st = self._key_state(key) if (c.per_key_max_concurrency or c.per_key_rate_per_s) else None
        if st is not None and c.per_key_max_concurrency and st.in_flight + units > c.per_key_max_concurrency:
            raise _too_many("too many concurrent requests for this API key", 1, "concurrency_limit_exceeded")
        if st is not None and st.bucket is not None:
            wait = st.bucket.take(units)
            if wait:
                raise _too_many("rate limit exceeded for this API key", wait, "rate_limit_exceeded")
        if self._global is not None:
            wait = self._global.take(units)
            if wait:
                if st is not None and st.bucket is not None:
                    st.bucket.tokens += units  # give the key's tokens back: the units were not admitted
                raise _too_many("rate limit exceeded on this router", wait, "rate_limit_exceeded")
        self.in_flight += units
        if st is not None:
            st.in_flight += units

    def _release(self, key: str, units: int) -> None:
        self.in_flight -= units
        st = self._keys.get(key)
        if st is not None:
            st.in_flight -= units
