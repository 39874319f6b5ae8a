"""Pushes from device memory: the prefill worker's side of the device path (docs/transfer.md, "Device memory").

:class:`DevicePush` lives in the vLLM worker process, beside the engine's KV caches. For a save that carries a
PD push, :class:`pdmesh.connector.worker.ConnectorWorker` asks it to :meth:`~DevicePush.stage` the chunks (the
pack kernel writes them on the device into a NIXL-registered staging region), then to :meth:`~DevicePush.submit`
the push: a background thread writes them from the staging region straight into the decode node: into the
decode worker's device landing when the router named one (``push_to_device``: device to device, UCX
cuda_ipc/rc; ``pdmesh.connector.device_landing``), else, or when that push fails (its slots are full: a
retryable ``TransferFailed`` at ALLOC; unreachable; ...), into the decode tier server's receiver (host pool: a
device-to-host NIXL WRITE), with the transfer layer's ALLOC/WRITE/COMMIT, leases and typed errors. The copy of the same chunks into the local
host tier (for reuse) is queued on a side CUDA stream and only the worker waits for it, not the push.

Contracts:

* :meth:`stage` blocks until the chunks are packed (the engine may then reuse its blocks); it returns None,
  staging nothing, when the region lacks room or a chunk is still staged for an earlier push: the caller uses
  the host path (pack into the tier pool, the tier server pushes).
* :meth:`submit` never blocks: a bounded queue, False when full (the caller then pushes through the tier). A
  push is bounded by its deadline (``Sender.push``).
* Who frees: a staged chunk's slot has two holders, its push and the caller (who copies it into the host tier);
  it is freed when both let go: the push when it ends however it ends (or at once when :meth:`submit` refuses
  it), the caller with :meth:`release` once its host copies are done (or abandoned). A push that fails at once
  (a dead peer) thus never frees a slot a host copy is about to read.
* :meth:`close` stops the thread (bounded join), closes the sender, then the staging region.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdmesh.connector.device_path import HostCopy, StagedChunks, StagePacker, staging_sender
from pdmesh.kvcache.transfer_node import parse_address
from pdmesh.transfer.errors import PoolExhausted, TransferError
from pdmesh.transfer.nixl_backend import NixlConfig
from pdmesh.transfer.sender import Chunk, Sender, SenderConfig

log = logging.getLogger("pdmesh.connector")
_STOP = object()


@dataclass
class DevicePushStats:
    pushes: int = 0
    failures: int = 0
    refused: int = 0  # submit found the queue full
    to_device: int = 0  # pushes that landed in the decode worker's device landing
    fallbacks: int = 0  # pushes the device landing did not take, sent to the decode tier instead
    chunks: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class _Job:
    peer: str
    transfer_id: str
    deadline: float  # time.monotonic
    chunks: list[Chunk]
    fallback: str | None = None  # where to push when ``peer`` does not take the chunks


class DevicePush:
    def __init__(self, staged: StagedChunks, sender: Sender, max_queued: int = 16) -> None:
        self.staged = staged
        self.sender = sender
        self.stats = DevicePushStats()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queued)
        self._holds: dict[bytes, int] = {}  # staged key -> holders left (its push, the caller)
        self._holds_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pdmesh-device-push", daemon=True)
        self._thread.start()

    @classmethod
    def build(
        cls,
        packer: StagePacker,
        blocks_per_chunk: int,
        slots: int,
        fingerprint: str,
        token: str,
        nixl: NixlConfig | None = None,
        engine: str = "",
    ) -> DevicePush:
        """A staging region of ``slots`` chunks on the caches' device and a NIXL sender over it; NIXL's agent is
        built and the region registered in a background thread (seconds), so the first push does not wait.
        ``engine``: this engine's fingerprint digest (hex): landings of another engine are refused at handshake."""
        staged = StagedChunks.on_device(packer, blocks_per_chunk, slots)
        sender = staging_sender(
            staged.staging,
            SenderConfig(fingerprint=fingerprint, engine=lambda: engine, token=token, backends=("nixl",)),
            nixl,
        )
        threading.Thread(target=sender.warm, name="pdmesh-device-push-warm", daemon=True).start()
        return cls(staged, sender)

    def stage(self, keys: Sequence[bytes], block_ids: Sequence[Sequence[int]]) -> list[Chunk] | None:
        """Pack every chunk (``keys[i]`` from ``block_ids[i]``) into the staging region; see the module doc. The
        caller must :meth:`submit` the chunks (or not) and :meth:`release` them after its host copies."""
        done: list[Chunk] = []
        try:
            for key, ids in zip(keys, block_ids, strict=True):
                off = self.staged.pack(key, ids)
                if off is None:  # still staged for an earlier push: its slot is that push's
                    raise PoolExhausted("chunk already staged")
                done.append(Chunk(key, off, self.staged.chunk_nbytes))
        except PoolExhausted:
            self._discard(done)
            return None
        except BaseException:
            self._discard(done)
            raise
        with self._holds_lock:
            for c in done:
                self._holds[c.key] = 2
        return done

    def release(self, chunks: Sequence[Chunk]) -> None:
        """The caller is done reading staged ``chunks`` (its host copies ended): their slots are freed once
        their push has ended too."""
        self._free(chunks)

    def copy_to_host(self, key: bytes, out: torch.Tensor) -> HostCopy:
        """Queue the copy of staged ``key`` into host memory ``out``; wait on the handle before using ``out``."""
        return self.staged.copy_to_host(key, out)

    def submit(
        self,
        peer: str,
        transfer_id: str,
        deadline_s: float,
        chunks: list[Chunk],
        fallback: str | None = None,
    ) -> bool:
        """Queue the push of staged ``chunks`` to ``peer`` ("host:port"), bounded by ``deadline_s`` from now; when
        that push fails, the same chunks go to ``fallback`` (if given) within the same deadline."""
        try:
            job = _Job(peer, transfer_id, time.monotonic() + deadline_s, chunks, fallback)
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats.refused += 1
            self._free(chunks)
            return False
        return True

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued push has ended (bounded); True when none is left."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return self._queue.unfinished_tasks == 0

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the push thread (pushes still queued end by their deadlines or are dropped), then free memory."""
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        self.sender.close()
        self.staged.staging.close()

    def _free(self, chunks: Sequence[Chunk]) -> None:
        """One holder of each of ``chunks`` lets go; the last one frees the slot."""
        last = []
        with self._holds_lock:
            for c in chunks:
                left = self._holds.get(c.key, 1) - 1
                if left > 0:
                    self._holds[c.key] = left
                else:
                    self._holds.pop(c.key, None)
                    last.append(c)
        self._discard(last)

    def _discard(self, chunks: Sequence[Chunk]) -> None:
        for c in chunks:
            self.staged.discard(c.key)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                assert isinstance(job, _Job)
                self._push(job)
            finally:
                self._queue.task_done()

    def _push(self, job: _Job) -> None:
        peer = job.peer
        try:
            try:
                result = self.sender.push(parse_address(peer), job.transfer_id, job.chunks, job.deadline)
                if job.fallback is not None:
                    self.stats.to_device += 1
            except (TransferError, ValueError) as exc:
                if job.fallback is None or job.fallback == peer:
                    raise
                log.info(
                    "device push %s to the landing %s failed (%s); pushing to %s",
                    job.transfer_id,
                    peer,
                    exc,
                    job.fallback,
                )
                self.stats.fallbacks += 1
                peer = job.fallback
                result = self.sender.push(parse_address(peer), job.transfer_id, job.chunks, job.deadline)
            self.stats.pushes += 1
            self.stats.chunks += len(result.written)
            self.stats.bytes += result.nbytes
        except (TransferError, ValueError) as exc:
            self.stats.failures += 1
            log.warning(
                "device push %s to %s failed (%s); the decoder computes instead",
                job.transfer_id,
                peer,
                exc,
            )
        finally:
            self._free(job.chunks)
