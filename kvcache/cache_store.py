"""The cache server's storage: an in-memory LRU of chunk payloads bounded in bytes.

Payload buffers are rounded up to 4 KiB pages and recycled, not freed (no page faults once full). Thread-safe
(one lock); a reader takes a reference (:meth:`CacheStore.acquire`) and sends outside the lock, so a concurrent
eviction never recycles a buffer that is being sent (:meth:`CacheStore.release` hands it back).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from pdmesh.kvcache.record import NO_FINGERPRINT, checksum


@dataclass
class _Item:
    fp: bytes
    csum: int
    mac: bytes  # the writer's record tag, stored opaquely (readers verify it)
    buf: bytearray  # capacity rounded up to a page; the payload is buf[:n]
    n: int
    refs: int = 0  # readers currently sending it
    dead: bool = False  # removed from the index; recycle buf when refs drop to 0

    @property
    def data(self) -> memoryview:
        return memoryview(self.buf)[: self.n]


@dataclass(frozen=True)
class CacheStats:
    items: int
    used_bytes: int
    max_bytes: int
    hits: int
    misses: int
    puts: int
    evictions: int
    corrupt: int
    connections: int
    buffer_bytes: int = 0


def _capacity(n: int) -> int:
    return max(_PAGE, -(-n // _PAGE) * _PAGE)


_PAGE = 4096


class CacheStore:
    """Byte-bounded LRU of verified chunk payloads. Thread-safe.

    Memory: payload buffers are recycled (free lists per page-rounded size) instead of freed, so a full cache
    that keeps evicting never page-faults new memory (first-touch faults dominate put cost on VMs). All buffers,
    live, reserved and free, stay within ``max_bytes``. A buffer being sent by a reader (``acquire``) is never
    recycled before ``release``."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes, _Item] = OrderedDict()
        self._used = 0  # capacity of live items' buffers
        self._buffers = 0  # capacity of every buffer we hold (live, reserved, free, dead-in-use)
        self._free: dict[int, list[bytearray]] = {}
        self.hits = self.misses = self.puts = self.evictions = self.corrupt = 0

    # ------------------------------------------------------------------ buffers (lock held)
    def _kill(self, key: bytes) -> None:
        item = self._items.pop(key)
        self._used -= len(item.buf)
        item.dead = True
        if item.refs == 0:
            self._free.setdefault(len(item.buf), []).append(item.buf)

    def _drop_free(self, need: int) -> None:
        for cap in list(self._free):
            lst = self._free[cap]
            while lst and self._buffers + need > self.max_bytes:
                lst.pop()
                self._buffers -= cap
            if not lst:
                del self._free[cap]

    def reserve(self, n: int) -> bytearray | None:
        """A buffer of at least ``n`` bytes for an incoming payload (evicting LRU items if needed), or None when
        ``n`` cannot fit. Give it back with :meth:`insert` or :meth:`unreserve`."""
        cap = _capacity(n)
        if cap > self.max_bytes:
            return None
        with self._lock:
            while True:
                lst = self._free.get(cap)
                if lst:
                    buf = lst.pop()
                    if not lst:
                        del self._free[cap]
                    return buf
                self._drop_free(cap)
                if self._buffers + cap <= self.max_bytes:
                    self._buffers += cap
                    break
                if not self._items:
                    return None  # everything is reserved or being sent
                self._kill(next(iter(self._items)))
                self.evictions += 1
        return bytearray(cap)

    def unreserve(self, buf: bytearray) -> None:
        with self._lock:
            self._free.setdefault(len(buf), []).append(buf)

    def insert(self, key: bytes, fp: bytes, csum: int, mac: bytes, buf: bytearray, n: int) -> bool:
        """Index a received payload whose checksum ``csum`` was verified; ``mac`` (the writer's record tag) is
        kept opaquely for readers to verify. False (buffer recycled) if the key is already present."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self._free.setdefault(len(buf), []).append(buf)
                return False
            self._items[key] = _Item(fp, csum, mac, buf, n)
            self._used += len(buf)
            self.puts += 1
            return True

    def put(self, key: bytes, data, fp: bytes = NO_FINGERPRINT, mac: bytes = b"") -> bool:
        """Copy ``data`` in with record tag ``mac`` (for in-process use and tests)."""
        view = memoryview(data).cast("B")
        buf = self.reserve(len(view))
        if buf is None:
            return False
        buf[: len(view)] = view
        return self.insert(key, fp, checksum(view), mac, buf, len(view))

    def acquire(self, key: bytes, fp: bytes | None) -> _Item | None:
        """The item for ``key`` with a reader reference (call :meth:`release`), or None (counted as a miss)."""
        with self._lock:
            item = self._items.get(key)
            if item is None or (fp is not None and item.fp != fp):
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            item.refs += 1
            return item

    def release(self, item: _Item) -> None:
        with self._lock:
            item.refs -= 1
            if item.dead and item.refs == 0:
                self._free.setdefault(len(item.buf), []).append(item.buf)

    def contains(self, keys: list[bytes]) -> int:
        n = 0
        with self._lock:
            for k in keys:
                if k not in self._items:
                    break
                n += 1
        return n

    def delete(self, keys: list[bytes]) -> int:
        n = 0
        with self._lock:
            for k in keys:
                if k in self._items:
                    self._kill(k)
                    n += 1
        return n

    def clear(self) -> int:
        with self._lock:
            keys = list(self._items)
            for k in keys:
                self._kill(k)
            return len(keys)

    def stats(self, connections: int = 0) -> CacheStats:
        with self._lock:
            return CacheStats(
                len(self._items),
                self._used,
                self.max_bytes,
                self.hits,
                self.misses,
                self.puts,
                self.evictions,
                self.corrupt,
                connections,
                self._buffers,
            )
