"""Remote tiers: the pdmesh cache server (``pdmesh://host:port``) and Redis (``redis://host:port/db``).

Both implement :class:`RemoteTier`. All calls block (network I/O): call them from a thread, never an event loop.
Every socket operation has a bounded timeout (``connect_timeout_s``, ``timeout_s``). :class:`GuardedRemote` wraps a
tier with a circuit breaker: after ``failures`` consecutive errors it stops calling the remote for ``cooldown_s``,
so a dead remote makes lookups miss at once instead of paying a timeout each time; errors never propagate from a
guarded tier (reads miss, writes are dropped, both counted).

Integrity: Redis values are a :mod:`kvcache.record` (header + payload), verified on every read; the cache server
sends the payload's checksum, verified by the client. A bad chunk is a miss (counted in ``corrupt``).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

from pdmesh.kvcache.cache_server import PROTO_VERSION
from pdmesh.kvcache.record import (
    HEADER_BYTES,
    NO_FINGERPRINT,
    CorruptRecord,
    FingerprintMismatch,
    RecordHeader,
    checksum,
)
from pdmesh.kvcache.wire import ProtocolError, recv_exact_into, recv_frame, send_frame, tune_tcp


class RemoteError(Exception):
    """A remote tier failed (connection, timeout, protocol or server error)."""


class RemoteUnavailable(RemoteError):
    """The remote is down or its circuit breaker is open."""


class RemoteTier(Protocol):
    name: str

    def put(self, key: bytes, data, fingerprint: bytes | None = None) -> bool: ...

    def get_into(self, key: bytes, out, fingerprint: bytes | None = None) -> int | None: ...

    def contains(self, keys: Sequence[bytes]) -> int: ...

    def clear(self) -> int: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------- pdmesh cache server client
class CacheServerClient:
    """Client of :mod:`kvcache.cache_server`. Thread-safe: a small pool of connections, one per concurrent call.
    Any socket error or timeout closes that connection and raises :class:`RemoteUnavailable`."""

    name = "cache_server"

    def __init__(
        self,
        host: str,
        port: int,
        token: str = "",
        *,
        timeout_s: float = 2.0,
        connect_timeout_s: float = 0.5,
        max_idle: int = 16,
    ) -> None:
        self.address = (host, port)
        self.token = token
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._idle: queue.LifoQueue[socket.socket] = queue.LifoQueue(max_idle)
        self.corrupt = 0

    def _connect(self) -> socket.socket:
        try:
            s = socket.create_connection(self.address, timeout=self.connect_timeout_s)
        except OSError as e:
            raise RemoteUnavailable(f"cache server {self.address[0]}:{self.address[1]}: {e}") from e
        tune_tcp(s)
        s.settimeout(self.timeout_s)
        try:
            send_frame(s, {"op": "hello", "proto": PROTO_VERSION, "token": self.token})
            reply = recv_frame(s)
        except (OSError, ProtocolError) as e:
            s.close()
            raise RemoteUnavailable(f"cache server hello failed: {e}") from e
        if not reply.get("ok"):
            s.close()
            raise RemoteError(f"cache server refused: {reply.get('error')}: {reply.get('message')}")
        return s

    def _call(self, fn):
        try:
            s = self._idle.get_nowait()
        except queue.Empty:
            s = self._connect()
        try:
            result = fn(s)
        except (OSError, ProtocolError, ValueError) as e:
            with contextlib.suppress(OSError):
                s.close()
            if isinstance(e, ValueError):
                raise
            raise RemoteUnavailable(f"cache server {self.address[0]}:{self.address[1]}: {e}") from e
        try:
            self._idle.put_nowait(s)
        except queue.Full:
            s.close()
        return result

    @staticmethod
    def _ok(reply: dict) -> dict:
        if not reply.get("ok"):
            raise RemoteError(f"cache server error {reply.get('error')}: {reply.get('message')}")
        return reply

    def put(self, key: bytes, data, fingerprint: bytes | None = None) -> bool:
        view = memoryview(data).cast("B")
        msg = {
            "op": "put",
            "key": key,
            "fp": fingerprint or NO_FINGERPRINT,
            "n": len(view),
            "csum": checksum(view),
        }

        def op(s: socket.socket) -> bool:
            send_frame(s, msg, view)
            return bool(self._ok(recv_frame(s)).get("stored"))

        return self._call(op)

    def get_into(self, key: bytes, out, fingerprint: bytes | None = None) -> int | None:
        dst = memoryview(out).cast("B")

        def op(s: socket.socket) -> int | None:
            send_frame(s, {"op": "get", "key": key, "fp": fingerprint})
            reply = self._ok(recv_frame(s))
            if not reply.get("hit"):
                return None
            n = reply["n"]
            if n > len(dst):
                raise ValueError(f"chunk is {n} bytes, buffer only {len(dst)}")  # closes the connection
            recv_exact_into(s, dst[:n])
            if checksum(dst[:n]) != reply.get("csum"):
                self.corrupt += 1
                return None
            return n

        return self._call(op)

    def get(self, key: bytes, fingerprint: bytes | None = None, max_bytes: int = 1 << 28) -> bytes | None:
        buf = bytearray(max_bytes)
        n = self.get_into(key, buf, fingerprint)
        return None if n is None else bytes(memoryview(buf)[:n])

    def contains(self, keys: Sequence[bytes]) -> int:
        def op(s: socket.socket) -> int:
            send_frame(s, {"op": "contains", "keys": list(keys)})
            return int(self._ok(recv_frame(s))["n"])

        return self._call(op)

    def _simple(self, msg: dict) -> dict:
        def op(s: socket.socket) -> dict:
            send_frame(s, msg)
            return self._ok(recv_frame(s))

        return self._call(op)

    def delete(self, keys: Sequence[bytes]) -> int:
        return int(self._simple({"op": "delete", "keys": list(keys)})["n"])

    def clear(self) -> int:
        return int(self._simple({"op": "clear"})["n"])

    def stats(self) -> dict:
        return self._simple({"op": "stats"})["stats"]

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


# ---------------------------------------------------------------------- Redis
class RedisTier:
    """Chunks in Redis under ``<prefix><key hex>``; the value is a verified record (header + payload)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        connect_timeout_s: float = 0.5,
        prefix: str = "pdmesh:kv:",
        ttl_s: int | None = None,
        max_connections: int = 32,
    ) -> None:
        import redis

        self._redis_errors = (redis.RedisError, OSError)
        self._pool = redis.BlockingConnectionPool.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=connect_timeout_s,
            max_connections=max_connections,
            timeout=timeout_s,
        )
        self._r = redis.Redis(connection_pool=self._pool)
        self.prefix = prefix.encode()
        self.ttl_s = ttl_s
        self.corrupt = 0

    def _k(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    def _guard(self, fn):
        try:
            return fn()
        except self._redis_errors as e:
            raise RemoteUnavailable(f"redis: {e}") from e

    def put(self, key: bytes, data, fingerprint: bytes | None = None) -> bool:
        view = memoryview(data).cast("B")
        value = RecordHeader.for_payload(key, view, fingerprint or NO_FINGERPRINT).pack() + view
        return bool(self._guard(lambda: self._r.set(self._k(key), value, ex=self.ttl_s, nx=True)))

    def _fetch(self, key: bytes, fingerprint: bytes | None) -> memoryview | None:
        """The verified payload of ``key`` (a view into the reply), or None. Corrupt values are deleted."""
        raw = self._guard(lambda: self._r.get(self._k(key)))
        if raw is None:
            return None
        try:
            hdr = RecordHeader.unpack(raw, key=key, fingerprint=fingerprint)
            payload = memoryview(raw)[HEADER_BYTES:]
            hdr.verify_payload(payload)
        except FingerprintMismatch:
            return None
        except CorruptRecord:
            self.corrupt += 1
            with contextlib.suppress(*self._redis_errors):
                self._r.delete(self._k(key))
            return None
        return payload

    def get_into(self, key: bytes, out, fingerprint: bytes | None = None) -> int | None:
        payload = self._fetch(key, fingerprint)
        if payload is None:
            return None
        dst = memoryview(out).cast("B")
        if len(payload) > len(dst):
            raise ValueError(f"chunk is {len(payload)} bytes, buffer only {len(dst)}")
        dst[: len(payload)] = payload
        return len(payload)

    def get(self, key: bytes, fingerprint: bytes | None = None) -> bytes | None:
        payload = self._fetch(key, fingerprint)
        return None if payload is None else bytes(payload)

    def contains(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0

        def op():
            pipe = self._r.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._k(k))
            return pipe.execute()

        n = 0
        for present in self._guard(op):
            if not present:
                break
            n += 1
        return n

    def clear(self) -> int:
        def op():
            n = 0
            for batch in _batched(self._r.scan_iter(match=self.prefix + b"*", count=500), 500):
                n += self._r.delete(*batch)
            return n

        return int(self._guard(op))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.disconnect()


def _batched(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------- circuit breaker
@dataclass
class RemoteStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    errors: int = 0
    short_circuited: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class CircuitBreaker:
    """Opens after ``failures`` consecutive errors; while open (``cooldown_s``) :meth:`allow` is False. After the
    cooldown one trial call is allowed (half-open); success closes it, failure reopens it. Thread-safe."""

    def __init__(self, failures: int = 3, cooldown_s: float = 2.0, clock=time.monotonic) -> None:
        self.failures, self.cooldown_s, self._clock = failures, cooldown_s, clock
        self._lock = threading.Lock()
        self._count = 0
        self._open_until = 0.0

    def allow(self) -> bool:
        with self._lock:
            now = self._clock()
            if self._count < self.failures:
                return True
            if now >= self._open_until:
                self._open_until = now + self.cooldown_s  # half-open: one trial per cooldown
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._count = 0

    def failure(self) -> None:
        with self._lock:
            self._count += 1
            if self._count >= self.failures:
                self._open_until = self._clock() + self.cooldown_s

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._count >= self.failures and self._clock() < self._open_until


class GuardedRemote:
    """A :class:`RemoteTier` behind a circuit breaker. Never raises for remote failures: reads miss, writes
    return False, ``contains`` returns 0. (ValueError for a too-small buffer still propagates.)"""

    def __init__(self, tier: RemoteTier, breaker: CircuitBreaker | None = None) -> None:
        self.tier = tier
        self.name = tier.name
        self.breaker = breaker or CircuitBreaker()
        self.stats = RemoteStats()

    def _run(self, fn, default):
        if not self.breaker.allow():
            self.stats.short_circuited += 1
            return default
        try:
            result = fn()
        except (RemoteError, OSError):
            self.breaker.failure()
            self.stats.errors += 1
            return default
        self.breaker.success()
        return result

    def put(self, key: bytes, data, fingerprint: bytes | None = None) -> bool:
        ok = self._run(lambda: self.tier.put(key, data, fingerprint), False)
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
        return self._run(self.tier.clear, 0)

    @property
    def available(self) -> bool:
        return not self.breaker.is_open

    def close(self) -> None:
        self.tier.close()


def open_remote(
    url: str, token: str = "", *, timeout_s: float = 2.0, connect_timeout_s: float = 0.5
) -> RemoteTier:
    """``redis://host:port/db`` (also ``rediss://``, ``unix://``) or ``pdmesh://host:port``. ValueError otherwise."""
    u = urlparse(url)
    if u.scheme in ("redis", "rediss", "unix"):
        return RedisTier(url, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
    if u.scheme == "pdmesh":
        if not u.hostname or not u.port:
            raise ValueError(f"remote URL {url!r}: pdmesh:// needs host:port")
        return CacheServerClient(
            u.hostname, u.port, token, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s
        )
    raise ValueError(f"remote URL {url!r}: scheme must be redis://, rediss://, unix:// or pdmesh://")
