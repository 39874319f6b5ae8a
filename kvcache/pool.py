"""ChunkPool: the tier's memory pool, fixed-size chunk slots in one shared-memory segment.

The tier server creates the pool; the vLLM process maps the same segment by name
(:func:`pdmesh.transfer.segment.attach_segment`) and
reads/writes chunk bytes at the ``(offset, length)`` the tier server hands out. One slot holds one chunk of up to
``slot_bytes`` bytes (all chunks of one model have the same size, so a slab allocator wastes nothing).

Chunk life: ``alloc`` -> ALLOCATED -> ``mark_written`` -> WRITTEN -> ``commit`` -> READY (visible to ``lookup``).
``abort`` drops a chunk that is not ready. An allocation may carry a lease (made for a remote writer): if it is
neither committed nor aborted, ``reclaim_expired`` frees it once ``deadline + grace`` has passed, never before. A
lease alone cannot stop a writer that stalls past it and writes straight into the segment (another process's
mapping, shm/NIXL): the transfer receiver gives the pool the latest time it could free a region and frees it
earlier only once the writer showed it stopped (:mod:`pdmesh.transfer.leases`); the connector allocates without
a lease (its slots are aborted when its control connection ends).

Eviction: when ``alloc`` finds no free slot it evicts the least recently used READY chunk that is neither pinned
(``pin``/``unpin``, held across time by a request) nor in use (``acquire``/``release``, held while bytes are read).
Pinned, in-use and not-yet-ready chunks are never evicted. With ``spill=True`` an evicted chunk's bytes are copied
out and queued for the disk tier (:meth:`drain_spilled`, bounded queue).

Thread-safety: one lock; every method is non-blocking (no I/O, at most one chunk copy when spilling) and safe to
call from an asyncio loop or any thread. Byte copies into/out of slots happen outside the lock under an
ALLOCATED state or an ``acquire`` reference.
"""

from __future__ import annotations

import enum
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pdmesh.kvcache.errors import KVCacheError
from pdmesh.transfer.segment import SharedSegment, attach_segment

__all__ = ["Allocation", "ChunkPool", "ChunkState", "PoolError", "PoolFull", "PoolStats", "attach_segment"]


class PoolError(KVCacheError):
    """Base class of pool errors."""


class PoolFull(PoolError):
    """No free slot and nothing evictable (everything pinned, in use or in flight)."""


class ChunkState(enum.IntEnum):
    ALLOCATED = 1
    WRITTEN = 2
    READY = 3


@dataclass(frozen=True)
class Allocation:
    offset: int
    length: int


@dataclass(frozen=True)
class PoolStats:
    slot_bytes: int
    num_slots: int
    free_slots: int
    ready: int
    in_flight: int
    pinned: int
    in_use: int
    used_bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    evictions: int
    expired_leases: int
    spill_dropped: int


@dataclass
class _Entry:
    slot: int
    nbytes: int
    state: ChunkState
    lease_deadline: float | None = None  # absolute time.monotonic(), grace included; None = no lease
    pins: int = 0
    refs: int = 0
    meta: dict = field(default_factory=dict)


class ChunkPool:
    """``num_slots`` slots of ``slot_bytes`` in a new POSIX shared-memory segment, unlinked by :meth:`close`.
    ``prefault=True`` touches every page at creation (slower start, no page faults on the data path)."""

    def __init__(
        self,
        slot_bytes: int,
        num_slots: int,
        *,
        name: str | None = None,
        lease_grace_s: float = 1.0,
        spill: bool = False,
        spill_queue_max: int = 64,
        prefault: bool = False,
        clock=time.monotonic,
    ) -> None:
        if slot_bytes <= 0 or num_slots <= 0:
            raise ValueError("slot_bytes and num_slots must be positive")
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.capacity_bytes = slot_bytes * num_slots
        self.lease_grace_s = lease_grace_s
        self.segment_name = name or f"pdmesh-tier-{os.getpid()}-{secrets.token_hex(4)}"
        self._segment = SharedSegment(self.segment_name, self.capacity_bytes, prefault=prefault)
        self.buffer = self._segment.buffer
        self._clock = clock
        self._lock = threading.Lock()
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._entries: dict[bytes, _Entry] = {}
        self._lru: OrderedDict[bytes, None] = OrderedDict()  # evictable entries only, oldest first
        self._spill = spill
        self._spill_max = spill_queue_max
        self._spilled: list[tuple[bytes, bytes, dict]] = []
        self._used_bytes = 0
        self._hits = self._misses = self._evictions = self._expired = self._spill_dropped = 0
        self._closed = False

    # ------------------------------------------------------------------ internals (lock held)
    def _evictable(self, e: _Entry) -> bool:
        return e.state is ChunkState.READY and e.pins == 0 and e.refs == 0

    def _sync_lru(self, key: bytes, e: _Entry) -> None:
        if self._evictable(e):
            if key not in self._lru:
                self._lru[key] = None
        else:
            self._lru.pop(key, None)

    def _drop(self, key: bytes) -> _Entry:
        e = self._entries.pop(key)
        self._lru.pop(key, None)
        self._free.append(e.slot)
        self._used_bytes -= e.nbytes
        return e

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if not self._lru:
            raise PoolFull(f"all {self.num_slots} slots are pinned, in use or in flight")
        victim, _ = self._lru.popitem(last=False)
        e = self._drop(victim)
        self._evictions += 1
        if self._spill:
            off = e.slot * self.slot_bytes
            if len(self._spilled) >= self._spill_max:
                self._spilled.pop(0)
                self._spill_dropped += 1
            self._spilled.append((victim, bytes(self.buffer[off : off + e.nbytes]), e.meta))
        return self._free.pop()

    def _view(self, e: _Entry) -> memoryview:
        off = e.slot * self.slot_bytes
        return self.buffer[off : off + e.nbytes]

    # ------------------------------------------------------------------ write path
    def alloc(
        self, key: bytes, nbytes: int, lease_s: float | None = None, meta: dict | None = None
    ) -> Allocation | None:
        """Reserve a slot for ``key``. Returns None if the key is already present (ready or in flight).
        ``lease_s``: the slot is reclaimable ``lease_s + lease_grace_s`` from now if not committed/aborted.
        Without a lease the caller must commit or abort (the tier server aborts a dead connection's allocations).
        Raises ValueError if ``nbytes`` does not fit a slot, PoolFull when nothing can be evicted."""
        deadline = None if lease_s is None else self._clock() + lease_s + self.lease_grace_s
        return self.alloc_until(key, nbytes, deadline, meta)

    def alloc_until(
        self, key: bytes, nbytes: int, lease_deadline: float | None, meta: dict | None = None
    ) -> Allocation | None:
        """:meth:`alloc` with an absolute lease deadline (``time.monotonic``, grace already included)."""
        if not 0 < nbytes <= self.slot_bytes:
            raise ValueError(f"a chunk of {nbytes} bytes does not fit a {self.slot_bytes}-byte slot")
        with self._lock:
            self._check_open()
            if key in self._entries:
                return None
            slot = self._take_slot()
            self._entries[key] = _Entry(slot, nbytes, ChunkState.ALLOCATED, lease_deadline, meta=meta or {})
            self._used_bytes += nbytes
            return Allocation(slot * self.slot_bytes, nbytes)

    def writable(self, key: bytes) -> memoryview:
        """The slot of an allocated (not ready) chunk, for the tier server's own writes. KeyError otherwise."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.state is ChunkState.READY:
                raise KeyError(key)
            return self._view(e)

    def mark_written(self, key: bytes) -> bool:
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.state is ChunkState.READY:
                return False
            e.state = ChunkState.WRITTEN
            return True

    def commit(self, key: bytes, nbytes: int | None = None) -> bool:
        """ALLOCATED/WRITTEN -> READY (lease cleared). ``nbytes`` shrinks the chunk's length first (a slot allocated
        before the size was known). False if the key is unknown (e.g. its lease expired)."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return False
            if e.state is not ChunkState.READY:
                if nbytes is not None:
                    if not 0 < nbytes <= self.slot_bytes:
                        raise ValueError(
                            f"a chunk of {nbytes} bytes does not fit a {self.slot_bytes}-byte slot"
                        )
                    self._used_bytes += nbytes - e.nbytes
                    e.nbytes = nbytes
                e.state = ChunkState.READY
                e.lease_deadline = None
                self._sync_lru(key, e)
            return True

    def abort(self, key: bytes) -> bool:
        """Free a chunk that is not ready (pins/refs on it are dropped with it). False if absent or ready."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.state is ChunkState.READY:
                return False
            self._drop(key)
            return True

    def put(self, key: bytes, data, meta: dict | None = None) -> bool:
        """alloc + copy + commit in one call. False if the key was already present."""
        a = self.alloc(key, len(data), None, meta)
        if a is None:
            return False
        try:
            self.buffer[a.offset : a.offset + a.length] = data
        except BaseException:
            self.abort(key)
            raise
        return self.commit(key)

    def remove(self, key: bytes) -> bool:
        """Drop a READY chunk that is neither pinned nor in use. False otherwise."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or not self._evictable(e):
                return False
            self._drop(key)
            return True

    def clear(self) -> int:
        """Remove every evictable chunk; returns how many."""
        with self._lock:
            keys = list(self._lru)
            for k in keys:
                self._drop(k)
            return len(keys)

    def reclaim_expired(self, now: float | None = None) -> int:
        """Free every not-ready chunk whose lease deadline (grace included) is before ``now``."""
        now = self._clock() if now is None else now
        with self._lock:
            dead = [
                k
                for k, e in self._entries.items()
                if e.state is not ChunkState.READY and e.lease_deadline is not None and e.lease_deadline < now
            ]
            for k in dead:
                self._drop(k)
            self._expired += len(dead)
            return len(dead)

    # ------------------------------------------------------------------ read path
    def lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys that are READY (marks them recently used; counts hits/misses)."""
        n = 0
        with self._lock:
            for k in keys:
                e = self._entries.get(k)
                if e is None or e.state is not ChunkState.READY:
                    break
                if k in self._lru:
                    self._lru.move_to_end(k)
                n += 1
            self._hits += n
            self._misses += len(keys) - n
        return n

    def locate(self, key: bytes) -> Allocation | None:
        """(offset, length) of a READY chunk, or None."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.state is not ChunkState.READY:
                return None
            return Allocation(e.slot * self.slot_bytes, e.nbytes)

    def meta(self, key: bytes) -> dict | None:
        with self._lock:
            e = self._entries.get(key)
            return None if e is None else e.meta

    def _adjust(self, keys: Iterable[bytes], attr: str, delta: int) -> int:
        done = 0
        with self._lock:
            for k in keys:
                e = self._entries.get(k)
                if e is None:
                    continue
                value = getattr(e, attr) + delta
                if value < 0:
                    continue
                setattr(e, attr, value)
                self._sync_lru(k, e)
                done += 1
        return done

    def pin(self, keys: Iterable[bytes]) -> int:
        """Pin present chunks (any state); a pinned chunk is never evicted. Returns how many were pinned."""
        return self._adjust(keys, "pins", +1)

    def unpin(self, keys: Iterable[bytes]) -> int:
        """Undo one :meth:`pin` per key; unknown or unpinned keys are ignored. Returns how many."""
        return self._adjust(keys, "pins", -1)

    def acquire(self, key: bytes) -> memoryview | None:
        """Take an in-use reference on a READY chunk and return a view of its bytes (valid until
        :meth:`release`), or None if the chunk is not ready."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.state is not ChunkState.READY:
                return None
            e.refs += 1
            self._sync_lru(key, e)
            if key in self._lru:
                self._lru.move_to_end(key)
            return self._view(e)

    def acquire_many(self, keys: Sequence[bytes]) -> list[Allocation]:
        """Take in-use references on the leading READY keys; returns their locations (stops at the first miss)."""
        out: list[Allocation] = []
        with self._lock:
            for k in keys:
                e = self._entries.get(k)
                if e is None or e.state is not ChunkState.READY:
                    break
                e.refs += 1
                self._sync_lru(k, e)
                out.append(Allocation(e.slot * self.slot_bytes, e.nbytes))
        return out

    def release(self, keys: Iterable[bytes]) -> int:
        """Drop one in-use reference per key (taken by :meth:`acquire`/:meth:`acquire_many`)."""
        return self._adjust(keys, "refs", -1)

    def get(self, key: bytes) -> bytes | None:
        """A copy of a READY chunk's bytes, or None."""
        view = self.acquire(key)
        if view is None:
            return None
        try:
            return bytes(view)
        finally:
            view.release()
            self.release([key])

    def read_into(self, key: bytes, out) -> int | None:
        """Copy a READY chunk into ``out`` (a writable buffer); returns its length, or None on a miss."""
        view = self.acquire(key)
        if view is None:
            return None
        try:
            n = len(view)
            memoryview(out).cast("B")[:n] = view
            return n
        finally:
            view.release()
            self.release([key])

    # ------------------------------------------------------------------ bookkeeping
    def drain_spilled(self) -> list[tuple[bytes, bytes, dict]]:
        """Take the queued (key, bytes, meta) of chunks evicted since the last call (spill=True only)."""
        with self._lock:
            out, self._spilled = self._spilled, []
            return out

    def keys(self, ready_only: bool = True) -> list[bytes]:
        with self._lock:
            return [k for k, e in self._entries.items() if not ready_only or e.state is ChunkState.READY]

    def holds(self) -> tuple[int, int]:
        """(total pins, total in-use refs) over all chunks; both are zero when the pool is idle."""
        with self._lock:
            return sum(e.pins for e in self._entries.values()), sum(e.refs for e in self._entries.values())

    def stats(self) -> PoolStats:
        with self._lock:
            es = self._entries.values()
            return PoolStats(
                slot_bytes=self.slot_bytes,
                num_slots=self.num_slots,
                free_slots=len(self._free),
                ready=sum(1 for e in es if e.state is ChunkState.READY),
                in_flight=sum(1 for e in es if e.state is not ChunkState.READY),
                pinned=sum(1 for e in es if e.pins),
                in_use=sum(1 for e in es if e.refs),
                used_bytes=self._used_bytes,
                capacity_bytes=self.capacity_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                expired_leases=self._expired,
                spill_dropped=self._spill_dropped,
            )

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError("pool is closed")

    def close(self) -> None:
        """Unmap and unlink the segment. Idempotent. Views handed out must be released first (else BufferError
        is swallowed and the mapping stays until they are garbage collected)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._segment.close()

    def __enter__(self) -> ChunkPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
