"""Worker half of the pdmesh connector: copies chunks between vLLM's paged KV cache and the tier's pool.

Runs in the model-runner process/thread. Blocking, by design and by vLLM's contract:
- :meth:`ConnectorWorker.load` runs in ``start_load_kv`` before the forward pass: for each chunk, pin it in the
  tier (so it cannot be evicted or reused while read), unpack it into the request's blocks, unpin. A chunk
  that is gone (evicted since the scheduler's lookup) or a tier that is down makes the blocks of that chunk and
  of every later chunk of the request "load errors": vLLM recomputes them (``kv_load_failure_policy=recompute``).
- :meth:`ConnectorWorker.save` runs in ``wait_for_save`` after the forward pass: reserve pool regions
  (chunks the tier already has are skipped), pack the blocks into them, commit. Then, for PD, ask the tier
  server to push the chunks to the decode node; the push itself runs in the tier server, not here.
- Device path (``device_push`` given: CUDA caches, NIXL, ``device_staging`` on; connector/device_push.py): a save
  carrying a push packs its chunks on the device into a NIXL-registered staging region and a background thread
  writes them from there to the decode node; the copy into the local tier (for reuse) runs on a side stream
  and only this save waits for it. Where the staging region has no room the save takes the host path above.
- Device landing (``landing`` given: a decode worker with the device path on; connector/device_landing.py): a
  load unpacks the chunks that landed in the worker's device staging region straight from there (no tier call
  for them) and acquires only the others from the tier; a chunk missing from both is a load error as above.
A failed save is only a future cache miss (logged and counted), never an engine error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from vllm.logger import init_logger

from pdmesh.connector.metadata import ChunkOp, PdmeshConnectorMetadata
from pdmesh.connector.stats import PdmeshKVConnectorStats, StatsInterval, counts_of

if TYPE_CHECKING:
    from pdmesh.connector.device_landing import DeviceLanding
    from pdmesh.connector.device_push import DevicePush

log = init_logger("pdmesh.connector")


class TierWorkerClient(Protocol):
    """What the worker half needs from the local tier server (all calls bounded by a timeout; raise on failure)."""

    def pool_view(self) -> memoryview:
        """Writable view of the whole shared-memory pool segment (mapped once)."""
        ...

    def acquire(self, keys: Sequence[bytes]) -> list[tuple[int, int] | None]:
        """Pin ready chunks for reading; (offset, nbytes) per key, None where not ready."""
        ...

    def release(self, keys: Sequence[bytes]) -> None: ...

    def alloc(self, keys: Sequence[bytes], nbytes: int) -> list[int | None]:
        """Reserve a region per key; None where the tier already has (or is receiving) that chunk."""
        ...

    def commit(self, keys: Sequence[bytes]) -> None: ...

    def abort(self, keys: Sequence[bytes]) -> None: ...

    def push(self, keys: Sequence[bytes], peer: str, transfer_id: str, deadline_s: float) -> None:
        """Queue a push of ready chunks to ``peer``'s receiver; returns without waiting for it."""
        ...


class Packer(Protocol):
    def chunk_nbytes(self, num_blocks: int) -> int: ...

    def pack(self, block_ids: Sequence[int], *, out: torch.Tensor) -> torch.Tensor: ...

    def unpack(self, buf: torch.Tensor, block_ids: Sequence[int]) -> None: ...


@dataclass
class WorkerStats:
    """The worker half's lifetime counts (chunks and bytes of this worker process's part). vLLM sees their growth
    per engine step, with the device path's, through :meth:`ConnectorWorker.take_stats` (connector/stats.py):
    ``vllm:pdmesh_<field>_total``."""

    loaded_chunks: int = 0
    load_errors: int = 0
    saved_chunks: int = 0
    skipped_saves: int = 0  # already in the tier
    save_errors: int = 0
    pushes: int = 0
    loaded_bytes: int = 0
    saved_bytes: int = 0
    device_pushes: int = 0  # pushes queued from device staging (also counted in ``pushes``)
    device_loads: int = 0  # chunks unpacked from the device landing (also counted in ``loaded_chunks``)


class ConnectorWorker:
    def __init__(
        self,
        tier: TierWorkerClient,
        packer: Packer,
        blocks_per_chunk: int,
        device_push: DevicePush | None = None,
        landing: DeviceLanding | None = None,
    ) -> None:
        self.tier = tier
        self.device_push = device_push
        self.landing = landing
        self.packer = packer
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_nbytes = packer.chunk_nbytes(blocks_per_chunk)
        self.stats = WorkerStats()
        self._pool: torch.Tensor | None = None
        self._pool_view: memoryview | None = None
        self._load_errors: set[int] = set()
        self._interval = StatsInterval()

    def _pool_tensor(self) -> torch.Tensor:
        """The pool as a uint8 tensor; re-wrapped when the tier's segment changed (a restarted tier server)."""
        view = self.tier.pool_view()
        if view is not self._pool_view or self._pool is None:
            self._pool = torch.frombuffer(view, dtype=torch.uint8)
            self._pool_view = view
        return self._pool

    # -- load ----------------------------------------------------------------------------------------
    def load(self, meta: PdmeshConnectorMetadata) -> None:
        for op in meta.loads:
            self._load_op(op)

    def _load_op(self, op: ChunkOp) -> None:
        done = 0  # chunks [0, done) are in vLLM's blocks
        acquired: list[bytes] = []
        landed = self.landing.landed(op.keys) if self.landing is not None else [False] * len(op.keys)
        try:
            places = self._acquire([k for k, on_device in zip(op.keys, landed, strict=True) if not on_device])
            acquired = [p[0] for p in places if p[1] is not None]
            from_tier = iter(places)
            for key, on_device, blocks in zip(op.keys, landed, op.block_ids, strict=True):
                if len(blocks) != self.blocks_per_chunk:
                    break
                if on_device:
                    assert self.landing is not None
                    if not self.landing.unpack(key, blocks):  # freed since: vLLM recomputes from here
                        break
                    self.stats.device_loads += 1
                    n = self.chunk_nbytes
                else:
                    place = next(from_tier)[1]
                    if place is None or place[1] != self.chunk_nbytes:
                        break
                    off, n = place
                    self.packer.unpack(self._pool_tensor()[off : off + n], blocks)
                done += 1
                self.stats.loaded_bytes += n
        except Exception as e:
            log.warning("loading chunks of %s failed (%s); vLLM recomputes them", op.req_id, e)
        finally:
            self.stats.loaded_chunks += done
            if acquired:
                try:
                    self.tier.release(acquired)
                except Exception as e:
                    log.warning("tier release failed: %s", e)
        if done < len(op.keys):
            self.stats.load_errors += len(op.keys) - done
            for blocks in op.block_ids[done:]:
                self._load_errors.update(blocks)

    def _acquire(self, keys: list[bytes]) -> list[tuple[bytes, tuple[int, int] | None]]:
        """Pin ``keys`` in the tier: (key, (offset, nbytes) or None) per key. A tier that fails counts as none
        ready (the chunks from the device landing still load)."""
        if not keys:
            return []
        try:
            places = self.tier.acquire(keys)
        except Exception as e:
            log.warning("tier acquire failed (%s); its chunks are recomputed", e)
            places = [None] * len(keys)
        return list(zip(keys, places, strict=True))

    def _commit(self, written: list) -> None:
        """COMMIT chunks whose bytes are in the pool, and count them as saved."""
        self.tier.commit(written)
        self.stats.saved_chunks += len(written)
        self.stats.saved_bytes += len(written) * self.chunk_nbytes

    def _sync_device(self) -> None:
        device = getattr(self.packer, "device", None)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    def take_stats(self) -> PdmeshKVConnectorStats | None:
        """What :attr:`stats` and the device path's stats (``device_push_*``, ``landing_*``) counted since the
        previous call (None: nothing), for vLLM's ``get_kv_connector_stats`` on the worker side. Call it from the
        model-runner thread only; the device path's threads may count meanwhile (nothing is lost)."""
        totals = counts_of(self.stats)
        if self.device_push is not None:
            totals.update(counts_of(self.device_push.stats, "device_push_"))
        if self.landing is not None:
            totals.update(counts_of(self.landing.stats, "landing_"))
        return self._interval.take(totals)

    def take_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    # -- save ----------------------------------------------------------------------------------------
    def save(self, meta: PdmeshConnectorMetadata) -> None:
        for op in meta.saves:
            self._save_op(op)

    def _save_op(self, op: ChunkOp) -> None:
        keys = [k for k, b in zip(op.keys, op.block_ids, strict=True) if len(b) == self.blocks_per_chunk]
        if not keys:
            return
        blocks_of = dict(zip(op.keys, op.block_ids, strict=True))
        if op.push is not None and self.device_push is not None and self._device_save_op(op, keys, blocks_of):
            return
        try:
            pool = self._pool_tensor()
            offsets = self.tier.alloc(keys, self.chunk_nbytes)
        except Exception as e:
            self.stats.save_errors += len(keys)
            log.warning("tier unavailable (%s); %d chunks of %s not cached", e, len(keys), op.req_id)
            return
        written: list[bytes] = []
        try:
            for key, off in zip(keys, offsets, strict=True):
                if off is None:
                    self.stats.skipped_saves += 1
                    continue
                self.packer.pack(blocks_of[key], out=pool[off : off + self.chunk_nbytes])
                written.append(key)
            if written:
                self._sync_device()  # GPU packs are queued on a stream: the bytes must be in the pool first
                self._commit(written)
        except Exception as e:
            self.stats.save_errors += len(keys)
            log.warning("saving chunks of %s failed: %s", op.req_id, e)
            pending = [k for k, off in zip(keys, offsets, strict=True) if off is not None]
            try:
                self.tier.abort(pending)
            except Exception:
                pass
            return
        if op.push is not None:
            try:
                self.tier.push(op.keys, op.push.peer, op.push.transfer_id, op.push.deadline_s)
                self.stats.pushes += 1
            except Exception as e:
                log.warning("PD push %s to %s could not be queued: %s", op.push.transfer_id, op.push.peer, e)

    def _device_save_op(self, op: ChunkOp, keys: list[bytes], blocks_of: dict[bytes, list[int]]) -> bool:
        """Stage ``keys`` on the device, queue their push from there, save them into the tier from the staging
        region. False (nothing done) when they cannot be staged: the caller takes the host path."""
        dp, push = self.device_push, op.push
        assert dp is not None and push is not None
        try:
            chunks = dp.stage(keys, [blocks_of[k] for k in keys])
        except Exception as e:
            log.warning("staging chunks of %s on the device failed (%s); host path", op.req_id, e)
            return False
        if chunks is None:
            return False
        if push.device_peer:  # the decode worker's device landing first, its tier when that fails
            pushed = dp.submit(
                push.device_peer, push.transfer_id, push.deadline_s, chunks, fallback=push.peer
            )
        else:
            pushed = dp.submit(push.peer, push.transfer_id, push.deadline_s, chunks)
        if pushed:
            self.stats.pushes += 1
            self.stats.device_pushes += 1
        written: list[bytes] = []
        offsets: list[int | None] = []
        copies = []
        try:
            pool = self._pool_tensor()
            offsets = self.tier.alloc(keys, self.chunk_nbytes)
            for key, off in zip(keys, offsets, strict=True):
                if off is None:
                    self.stats.skipped_saves += 1
                    continue
                copies.append(dp.copy_to_host(key, pool[off : off + self.chunk_nbytes]))
                written.append(key)
            for c in copies:  # before COMMIT, and before the slots may be freed
                c.wait()
            copies = []
            if written:
                self._commit(written)
        except Exception as e:
            self.stats.save_errors += len(keys)
            log.warning("saving chunks of %s from device staging failed: %s", op.req_id, e)
            try:
                self.tier.abort([k for k, off in zip(keys, offsets, strict=False) if off is not None])
            except Exception:
                pass
            written = []
        finally:
            for c in copies:  # an error left copies queued: they still read the slots
                try:
                    c.wait()
                except Exception:
                    pass
            dp.release(chunks)  # this save's hold on the slots; the push holds them until it ends
        if not pushed and written:  # the device queue was full: the tier pushes what it now holds
            try:
                self.tier.push(op.keys, push.peer, push.transfer_id, push.deadline_s)
                self.stats.pushes += 1
            except Exception as e:
                log.warning("PD push %s to %s could not be queued: %s", push.transfer_id, push.peer, e)
        return True
