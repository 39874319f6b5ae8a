"""Staging region: fixed-size slots in ONE registered memory region, on a device (VRAM) or on the host (DRAM).

The device path of a push (docs/transfer.md, "Device memory"): the prefill side packs a chunk on the device into a
slot of its staging region and NIXL writes it from there into a slot of the decode side's staging region, which the
unpack kernel (``pdmesh.kernels``) then scatters into vLLM's paged blocks. No host copy on that path.

:class:`StagingRegion` allocates the memory once (a uint8 torch tensor on ``device``), never moves or frees it
while open, and describes it as a :class:`~pdmesh.transfer.backend.MemoryRegion` (``VRAM`` on CUDA, ``DRAM``
otherwise) for :meth:`NixlBackend.register_region` (``Receiver`` and ``Sender`` do that themselves when handed
a staging region). On the host it also exposes ``buffer`` (a memoryview of the same bytes), so the TCP backend
and the tests can use it: the same class, registered as NIXL DRAM, is what runs on a CPU-only machine.

It is a :class:`~pdmesh.transfer.provider.RegionProvider` (the decode side's :class:`Receiver` ALLOCs and COMMITs
into it under leases) and has a consumer side. Slot states::

    free -> leased (alloc, until lease_deadline) -> ready (commit) -> reading (acquire) -> free (release)
    leased -> free (abort, or reclaim_expired after the deadline);  ready -> free (discard)

The prefill side reserves slots for its own packs with ``alloc(key, n, math.inf)`` (no expiry) and frees them
with :meth:`discard` once the write and the copy into the host tier are done. The decode side
(``pdmesh.connector.device_landing``) sets ``on_commit`` (a constructor argument or the attribute, before any
push): called with the key after each leased -> ready
change, outside the region's lock (it may call back into the region, e.g. :meth:`acquire`); it must not block. Thread-safe (one lock + a
condition for :meth:`wait_ready`). ``torch`` is imported when a region is built, never at module import (the
transfer layer stays torch-free for the tier server).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdmesh.transfer.backend import MemoryRegion
from pdmesh.transfer.errors import PoolExhausted

if TYPE_CHECKING:
    import torch

__all__ = ["StagingRegion", "StagingStats"]


@dataclass(frozen=True)
class StagingStats:
    num_slots: int
    free: int
    leased: int
    ready: int
    reading: int


@dataclass
class _Slot:
    index: int
    nbytes: int
    state: str  # "leased" | "ready" | "reading"
    deadline: float


class StagingRegion:
    """``num_slots`` slots of ``slot_bytes`` in one uint8 tensor on ``device`` ("cpu", "cuda", "cuda:1", ...).

    ``pin_memory`` (host regions on a CUDA machine): page-locked memory, so device kernels can read and write it
    directly. The region owns its tensor; :meth:`close` drops it and must come after every backend it was
    registered with is closed (a Receiver or Sender closes its backends in ``close``); the memory itself is
    freed with the object (torch's allocator), never while a view of it is alive.
    """

    segment_name: str | None = None  # not a shared-memory segment: the shm backend is never offered for it

    def __init__(
        self,
        slot_bytes: int,
        num_slots: int,
        device: str = "cpu",
        *,
        pin_memory: bool = False,
        on_commit: Callable[[bytes], None] | None = None,
    ) -> None:
        import torch

        if slot_bytes <= 0 or num_slots <= 0:
            raise ValueError("slot_bytes and num_slots must be positive")
        dev = torch.device(device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"staging regions live on cpu or cuda devices, not {dev}")
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.device = dev
        size = slot_bytes * num_slots
        if dev.type == "cuda":
            self.tensor = torch.empty(size, dtype=torch.uint8, device=dev)
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            self.memory_region = MemoryRegion(self.tensor.data_ptr(), size, "VRAM", int(index))
            self.buffer: memoryview | None = None
        else:
            self.tensor = torch.zeros(size, dtype=torch.uint8, pin_memory=pin_memory)
            self.memory_region = MemoryRegion(self.tensor.data_ptr(), size, "DRAM", 0)
            self.buffer = memoryview(self.tensor.numpy()).cast("B")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._free = list(range(num_slots - 1, -1, -1))
        self._slots: dict[bytes, _Slot] = {}
        self._closed = False
        self.on_commit = on_commit

    # RegionProvider (the decode side's Receiver; also the prefill side's own reservations)
    def alloc(self, key: bytes, nbytes: int, lease_deadline: float) -> int | None:
        """Lease a slot for ``key`` until ``lease_deadline`` (time.monotonic; ``math.inf``: no expiry) and return
        its byte offset; None when ``key`` already has a slot. Raises PoolExhausted when every slot is taken,
        ValueError for a chunk larger than a slot."""
        if nbytes <= 0 or nbytes > self.slot_bytes:
            raise ValueError(f"chunk of {nbytes} bytes does not fit a {self.slot_bytes}-byte staging slot")
        with self._lock:
            if self._closed:
                raise PoolExhausted("staging region is closed")
            if key in self._slots:
                return None
            if not self._free:
                raise PoolExhausted(f"all {self.num_slots} staging slots are in use")
            index = self._free.pop()
            self._slots[key] = _Slot(index, nbytes, "leased", lease_deadline)
            return index * self.slot_bytes

    def commit(self, key: bytes) -> None:
        """The bytes of ``key`` are in place: the slot becomes ready (wakes :meth:`wait_ready`, calls
        ``on_commit``)."""
        with self._lock:
            s = self._slots.get(key)
            if s is None or s.state != "leased":
                return
            s.state = "ready"
            s.deadline = math.inf
            self._changed.notify_all()
        if self.on_commit is not None:
            self.on_commit(key)

    def abort(self, key: bytes) -> None:
        """Free a leased (not yet committed) slot at once."""
        self._drop_if(key, "leased")

    def reclaim_expired(self, now: float) -> int:
        with self._lock:
            gone = [k for k, s in self._slots.items() if s.state == "leased" and s.deadline < now]
            for k in gone:
                self._drop(k)
            return len(gone)

    # consumer side
    def offset(self, key: bytes) -> int | None:
        """Byte offset of ``key``'s slot (any state), or None."""
        with self._lock:
            s = self._slots.get(key)
            return None if s is None else s.index * self.slot_bytes

    def view(self, key: bytes) -> torch.Tensor:
        """The ``nbytes``-long uint8 view of ``key``'s slot (a view of the region's tensor; no copy). KeyError when
        ``key`` has no slot. Writing into a slot another side may still write is the caller's mistake."""
        with self._lock:
            return self._view(self._slots[key])

    def wait_ready(self, keys: Sequence[bytes], deadline: float) -> list[bytes]:
        """Block until every key is ready (or being read) or ``deadline`` (time.monotonic) passes; returns the
        keys that are ready, in order. Never waits past the deadline."""
        with self._lock:
            while True:
                ready = [k for k in keys if k in self._slots and self._slots[k].state in ("ready", "reading")]
                left = deadline - time.monotonic()
                if len(ready) == len(keys) or left <= 0 or self._closed:
                    return ready
                self._changed.wait(min(left, 0.05))

    def acquire(self, key: bytes) -> torch.Tensor | None:
        """Pin a ready slot for reading (it cannot be discarded meanwhile) and return its view; None when ``key``
        is not ready. Pair with :meth:`release`."""
        with self._lock:
            s = self._slots.get(key)
            if s is None or s.state != "ready":
                return None
            s.state = "reading"
            return self._view(s)

    def release(self, key: bytes) -> None:
        """Done reading ``key`` (acquired): the slot is freed."""
        self._drop_if(key, "reading")

    def discard(self, key: bytes) -> None:
        """Free a ready slot nobody reads (the prefill side after its write and host copy; an unused chunk)."""
        self._drop_if(key, "ready")

    def stats(self) -> StagingStats:
        with self._lock:
            states = [s.state for s in self._slots.values()]
            return StagingStats(
                self.num_slots,
                len(self._free),
                states.count("leased"),
                states.count("ready"),
                states.count("reading"),
            )

    def close(self) -> None:
        """Forget every slot (later allocs raise PoolExhausted) and release the host view. Close the backends
        registered over it first. Idempotent."""
        with self._lock:
            self._closed = True
            self._slots.clear()
            self._free = []
            self._changed.notify_all()
        if self.buffer is not None:
            self.buffer.release()
            self.buffer = None

    def _view(self, s: _Slot) -> torch.Tensor:
        start = s.index * self.slot_bytes
        return self.tensor[start : start + s.nbytes]

    def _drop_if(self, key: bytes, state: str) -> None:
        """Free ``key``'s slot when it is in ``state`` (any other state, or no slot: nothing)."""
        with self._lock:
            s = self._slots.get(key)
            if s is not None and s.state == state:
                self._drop(key)

    def _drop(self, key: bytes) -> None:
        s = self._slots.pop(key)
        self._free.append(s.index)
