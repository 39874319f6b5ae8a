"""RegionProvider: what the transfer receiver needs from the receiving tier's memory pool.

The tier's chunk pool implements this (an adapter is fine); :class:`transfer.reference_pool.ReferencePool` is the
simple reference implementation used by the tests and the benchmark.

Contract (all methods are called by :class:`transfer.receiver.Receiver` under its own lock, from its threads):

* ``alloc(key, nbytes, lease_deadline)`` reserves a region for chunk ``key`` and returns its byte offset in
  ``buffer``, or ``None`` when the key is already present (ready, or already in flight in another transfer): the
  sender then skips it. The region stays reserved (a lease) until ``commit``, ``abort`` or, if neither comes,
  until ``reclaim_expired`` runs after ``lease_deadline`` (time.monotonic): the latest time the receiver could
  free it itself (its grace included and, for a one-sided writer, the time it waits for that writer to show it
  stopped: :mod:`pdmesh.transfer.leases`), so the provider's own reclaim is only a backstop for a receiver that
  stopped reaping.
  Raise :class:`transfer.errors.PoolExhausted` when nothing is free, ValueError for a size it cannot hold.
* ``commit(key)``: the bytes are in place; the chunk becomes ready (visible to the tier). Unknown key: no-op.
* ``abort(key)``: drop the lease; the region may be reused at once (the receiver only calls it after the grace).
* ``reclaim_expired(now)``: free every lease whose deadline is before ``now``; return how many.
* ``buffer``: writable memoryview of the whole pool segment; ``segment_name``: its shared-memory name (or None).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class RegionProvider(Protocol):
    buffer: memoryview
    segment_name: str | None

    def alloc(self, key: bytes, nbytes: int, lease_deadline: float) -> int | None: ...

    def commit(self, key: bytes) -> None: ...

    def abort(self, key: bytes) -> None: ...

    def reclaim_expired(self, now: float) -> int: ...
