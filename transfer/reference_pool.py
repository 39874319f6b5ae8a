"""ReferencePool: the simple reference RegionProvider (a slab allocator over one shared-memory segment).

Not the tier: fixed-size slots, no eviction, no disk. Real code used by the transfer tests and benchmark and as
the model for the adapter over the kvcache tier's pool. Thread-safe (one lock).

Slot states: free -> leased (alloc) -> ready (commit) -> free (consume); leased -> free (abort or lease expiry).
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass

from pdmesh.transfer.errors import PoolExhausted
from pdmesh.transfer.segment import SharedSegment, attach_segment

__all__ = ["PoolStats", "ReferencePool", "attach_segment"]


@dataclass(frozen=True)
class PoolStats:
    num_slots: int
    free: int
    leased: int
    ready: int


@dataclass
class _Entry:
    slot: int
    nbytes: int
    lease_deadline: float | None  # None once ready


class ReferencePool:
    """``num_slots`` slots of ``slot_bytes`` each in a new shared-memory segment (unlinked by :meth:`close`);
    ``prefault`` touches every page at creation, as the tier's pool does by default (no page faults on the data
    path: a receiver writing into pages never touched faults in every 4 KiB page)."""

    def __init__(
        self, slot_bytes: int, num_slots: int, name: str | None = None, *, prefault: bool = False
    ) -> None:
        if slot_bytes <= 0 or num_slots <= 0:
            raise ValueError("slot_bytes and num_slots must be positive")
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self._segment = SharedSegment(
            name or f"pdmesh-ref-{os.getpid()}-{secrets.token_hex(4)}",
            slot_bytes * num_slots,
            prefault=prefault,
        )
        self.buffer: memoryview = self._segment.buffer
        self.segment_name: str | None = self._segment.name
        self._lock = threading.Lock()
        self._free = list(range(num_slots - 1, -1, -1))
        self._entries: dict[bytes, _Entry] = {}

    # RegionProvider
    def alloc(self, key: bytes, nbytes: int, lease_deadline: float) -> int | None:
        if nbytes <= 0 or nbytes > self.slot_bytes:
            raise ValueError(f"chunk of {nbytes} bytes does not fit a {self.slot_bytes}-byte slot")
        with self._lock:
            if key in self._entries:
                return None
            if not self._free:
                raise PoolExhausted(f"no free slot ({self.num_slots} in use)")
            slot = self._free.pop()
            self._entries[key] = _Entry(slot, nbytes, lease_deadline)
            return slot * self.slot_bytes

    def commit(self, key: bytes) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                e.lease_deadline = None

    def abort(self, key: bytes) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.lease_deadline is not None:
                del self._entries[key]
                self._free.append(e.slot)

    def reclaim_expired(self, now: float) -> int:
        with self._lock:
            dead = [
                k for k, e in self._entries.items() if e.lease_deadline is not None and e.lease_deadline < now
            ]
            for k in dead:
                self._free.append(self._entries.pop(k).slot)
            return len(dead)

    # tier-side helpers (reference only)
    def get(self, key: bytes) -> memoryview | None:
        """The bytes of a ready chunk (a view into the pool; valid until :meth:`consume`), or None."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.lease_deadline is not None:
                return None
            off = e.slot * self.slot_bytes
            return self.buffer[off : off + e.nbytes]

    def consume(self, key: bytes) -> bool:
        """Free a ready chunk's slot. Returns False if the key is not ready."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.lease_deadline is not None:
                return False
            del self._entries[key]
            self._free.append(e.slot)
            return True

    def stats(self) -> PoolStats:
        with self._lock:
            leased = sum(1 for e in self._entries.values() if e.lease_deadline is not None)
            return PoolStats(self.num_slots, len(self._free), leased, len(self._entries) - leased)

    def close(self) -> None:
        """Release and unlink the segment. Views handed out by :meth:`get` must be released first."""
        self._segment.close()
