"""Remote tiers: the pdmesh cache server (``pdmesh://host:port``, :mod:`pdmesh.kvcache.remote_cache_server`) and
Redis (``redis://host:port/db``, :mod:`pdmesh.kvcache.remote_redis`), both behind :class:`RemoteTier`.

All calls block (network I/O): call them from a thread, never an event loop. Every socket operation has a bounded
timeout (``connect_timeout_s``, ``timeout_s``). :class:`GuardedRemote` wraps a tier with a
:class:`pdmesh.breaker.CircuitBreaker`: after ``failures`` consecutive errors it stops calling the remote for the
cooldown, so a dead remote makes lookups miss at once instead of paying a timeout each time; errors never
propagate from a guarded tier (reads miss, writes are dropped, both counted).

Integrity: both tiers store each chunk with a record tag (:class:`pdmesh.kvcache.record.RecordMac`) keyed from the
cluster ``token`` given to :func:`open_remote`, and verify it on every read. A chunk that another writer planted
or altered without the token, or that was written under another token, is a miss counted in the tier's
``mac_failures`` (malformed values in ``corrupt``); the remote server itself is never trusted with integrity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

from pdmesh.breaker import CircuitBreaker
from pdmesh.kvcache.errors import RemoteError, RemoteUnavailable
from pdmesh.kvcache.remote_cache_server import CacheServerClient
from pdmesh.kvcache.remote_redis import RedisTier

__all__ = [
    "CacheServerClient",
    "CircuitBreaker",
    "GuardedRemote",
    "RedisTier",
    "RemoteError",
    "RemoteStats",
    "RemoteTier",
    "RemoteUnavailable",
    "open_remote",
    "remote_breaker",
]


class RemoteTier(Protocol):
    name: str

    def put(self, key: bytes, data, fingerprint: bytes | None = None) -> bool: ...

    def get_into(self, key: bytes, out, fingerprint: bytes | None = None) -> int | None: ...

    def contains(self, keys: Sequence[bytes]) -> int: ...

    def clear(self) -> int: ...

    def close(self) -> None: ...


@dataclass
class RemoteStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    errors: int = 0
    short_circuited: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


def remote_breaker(failures: int = 3, cooldown_s: float = 2.0) -> CircuitBreaker:
    """The remote's breaker: open after ``failures`` consecutive errors, one trial every ``cooldown_s``."""
    return CircuitBreaker(failures=failures, open_s=cooldown_s, max_open_s=cooldown_s)


class GuardedRemote:
    """A :class:`RemoteTier` behind two circuit breakers, one for reads (``get_into``, ``contains``) and one for
    writes (``put``, ``clear``): a remote that refuses writes (a full Redis with ``noeviction``) still serves the
    chunks it holds. Never raises for remote failures: reads miss, writes return False, ``contains`` returns 0.
    (ValueError for a too-small buffer still propagates.)"""

    def __init__(
        self,
        tier: RemoteTier,
        breaker: CircuitBreaker | None = None,
        write_breaker: CircuitBreaker | None = None,
    ) -> None:
        self.tier = tier
        self.name = tier.name
        self.breaker = breaker or remote_breaker()  # reads
        self.write_breaker = write_breaker or CircuitBreaker(
            self.breaker.failures, self.breaker.open_s, self.breaker.max_open_s, clock=self.breaker.clock
        )
        self.stats = RemoteStats()

    def _run(self, fn, default, breaker: CircuitBreaker | None = None):
        breaker = breaker or self.breaker
        if not breaker.try_acquire():
            self.stats.short_circuited += 1
            return default
        try:
            result = fn()
        except (RemoteError, OSError):
            breaker.record_failure()
            self.stats.errors += 1
            return default
        except BaseException:
            breaker.release_trial()
            raise
        breaker.record_success()
        return result

    def put(self, key: bytes, data, fingerprint: bytes | None = None) -> bool:
        ok = self._run(lambda: self.tier.put(key, data, fingerprint), False, self.write_breaker)
        if ok:
            self.stats.puts += 1
            self.stats.bytes_written += len(memoryview(data).cast("B"))
        return ok

    def get_into(self, key: bytes, out, fingerprint: bytes | None = None) -> int | None:
        n = self._run(lambda: self.tier.get_into(key, out, fingerprint), None)
        if n is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
            self.stats.bytes_read += n
        return n

    def contains(self, keys: Sequence[bytes]) -> int:
        return self._run(lambda: self.tier.contains(keys), 0)

    def clear(self) -> int:
        return self._run(self.tier.clear, 0, self.write_breaker)

    @property
    def corrupt(self) -> int:
        """Malformed chunks the remote returned (read as misses)."""
        return int(getattr(self.tier, "corrupt", 0))

    @property
    def mac_failures(self) -> int:
        """Chunks whose record tag did not verify (read as misses): planted, altered or foreign records."""
        return int(getattr(self.tier, "mac_failures", 0))

    @property
    def available(self) -> bool:
        """Reads are served (writes may be refused: see ``writable``)."""
        return not self.breaker.is_open

    @property
    def writable(self) -> bool:
        return not self.write_breaker.is_open

    def close(self) -> None:
        self.tier.close()


def open_remote(
    url: str,
    token: str = "",
    *,
    timeout_s: float = 2.0,
    connect_timeout_s: float = 0.5,
    ttl_s: int | None = None,
) -> RemoteTier:
    """``redis://[[user]:password@]host:port/db`` (also ``rediss://`` for TLS, ``unix://``) or
    ``pdmesh://host:port``; ValueError otherwise. ``token`` is the cluster token: it keys the record tags of both
    tiers and authenticates to the cache server (Redis authenticates with the URL's credentials)."""
    u = urlparse(url)
    if u.scheme in ("redis", "rediss", "unix"):
        return RedisTier(url, token, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, ttl_s=ttl_s)
    if u.scheme == "pdmesh":
        if not u.hostname or not u.port:
            raise ValueError(f"remote URL {url!r}: pdmesh:// needs host:port")
        return CacheServerClient(
            u.hostname, u.port, token, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s
        )
    raise ValueError(f"remote URL {url!r}: scheme must be redis://, rediss://, unix:// or pdmesh://")
