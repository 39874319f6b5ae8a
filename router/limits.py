"""Admission control: token-bucket rate limits and concurrency limits, global and per API key.

Contract: :meth:`Limiter.admit` either returns a :class:`Permit` (the caller must ``release()`` it when the
response is finished; release is idempotent) or raises :class:`OpenAIError` 429 with a ``Retry-After`` header
(whole seconds, >= 1) and an OpenAI ``rate_limit_error`` body. Nothing waits: a request over a limit is refused
at once. Per-key state is bounded (at most ``max_keys`` keys are tracked; the idlest are dropped).
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

    def take(self) -> float:
        """Take one token; returns 0.0 on success, else the seconds until one is available."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


@dataclass
class _KeyState:
    bucket: TokenBucket | None
    in_flight: int = 0


class Permit:
    __slots__ = ("_done", "_key", "_limiter")

    def __init__(self, limiter: Limiter, key: str) -> None:
        self._limiter = limiter
        self._key = key
        self._done = False

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._limiter._release(self._key)


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

    def admit(self, key: str) -> Permit:
        """Admit one request of API key ``key`` or raise 429 (see module contract)."""
        c = self.cfg
        if c.max_concurrency and self.in_flight >= c.max_concurrency:
            raise _too_many("too many concurrent requests on this router", 1, "concurrency_limit_exceeded")
        st = self._key_state(key) if (c.per_key_max_concurrency or c.per_key_rate_per_s) else None
        if st is not None and c.per_key_max_concurrency and st.in_flight >= c.per_key_max_concurrency:
            raise _too_many("too many concurrent requests for this API key", 1, "concurrency_limit_exceeded")
        if st is not None and st.bucket is not None:
            wait = st.bucket.take()
            if wait:
                raise _too_many("rate limit exceeded for this API key", wait, "rate_limit_exceeded")
        if self._global is not None:
            wait = self._global.take()
            if wait:
                if st is not None and st.bucket is not None:
                    st.bucket.tokens += 1.0  # give the key's token back: the request was not admitted
                raise _too_many("rate limit exceeded on this router", wait, "rate_limit_exceeded")
        self.in_flight += 1
        if st is not None:
            st.in_flight += 1
        return Permit(self, key)

    def _release(self, key: str) -> None:
        self.in_flight -= 1
        st = self._keys.get(key)
        if st is not None:
            st.in_flight -= 1
