"""Redis as a remote tier (``redis://host:port/db``, ``rediss://``, ``unix://``), a
:class:`pdmesh.kvcache.remote.RemoteTier`.

All calls block (network I/O): call them from a thread, never an event loop; every call is bounded by the
pool's socket timeouts. Each value is a version-2 :mod:`pdmesh.kvcache.record` (header with a tag keyed from the
cluster token, then the payload), verified on every read. A value that fails is read as a miss, never an
exception, and deleted (so a planted value cannot block the ``SET NX`` of the genuine one): a malformed value is
counted in ``corrupt``, one whose tag does not verify (planted or altered by a writer without the token, written
under another token, damaged, or an older record version) in ``mac_failures``. Clusters with different tokens
must not share a database and prefix: each would delete the other's records.

The URL is redis-py's: ``redis://[[user]:password@]host:port/db`` (AUTH with a password or an ACL user),
``rediss://...`` (TLS; redis-py's ``ssl_*`` query parameters, e.g. ``ssl_ca_certs``) and
``unix:///path?db=0``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from pdmesh.kvcache.errors import RemoteUnavailable
from pdmesh.kvcache.record import CorruptRecord, FingerprintMismatch, RecordMac, UnauthenticRecord


class RedisTier:
    """Chunks in Redis under ``<prefix><key hex>``; the value is a record (header + payload) tagged with
    ``token``'s record MAC (unkeyed digest when ``token`` is empty) and verified on every read."""

    name = "redis"

    def __init__(
        self,
        url: str,
        token: str = "",
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
        self.mac = RecordMac(token)
        self.corrupt = 0  # malformed values read (and deleted)
        self.mac_failures = 0  # values whose tag did not verify (and deleted)

    def _k(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    def _guard(self, fn):
        try:
            return fn()
        except self._redis_errors as e:
            raise RemoteUnavailable(f"redis: {e}") from e

    def put(self, key: bytes, data, fingerprint: bytes | None = None) -> bool:
        view = memoryview(data).cast("B")
        value = self.mac.seal(key, view, fingerprint) + view
        return bool(self._guard(lambda: self._r.set(self._k(key), value, ex=self.ttl_s, nx=True)))

    def _fetch(self, key: bytes, fingerprint: bytes | None) -> memoryview | None:
        """The verified payload of ``key`` (a view into the reply), or None. Values that fail verification are
        counted and deleted; a genuine record of another fingerprint is a plain miss."""
        raw = self._guard(lambda: self._r.get(self._k(key)))
        if raw is None:
            return None
        try:
            return self.mac.open(raw, key, fingerprint)
        except FingerprintMismatch:
            return None
        except UnauthenticRecord:
            self.mac_failures += 1
        except CorruptRecord:
            self.corrupt += 1
        with contextlib.suppress(*self._redis_errors):
            self._r.delete(self._k(key))
        return None

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
