"""Pushes received into device memory: the decode worker's side of the device path (docs/transfer.md, "Device
memory").

:class:`DeviceLanding` lives in the vLLM (decode) worker process, beside the engine's KV caches. It owns a
:class:`~pdmesh.transfer.device_staging.StagingRegion` on the caches' device (VRAM on CUDA, DRAM on a host) and a
transfer :class:`~pdmesh.transfer.receiver.Receiver` over it with its own NIXL agent, which registers the region.
Its address is the worker's ``device_transfer_address`` (the router names it as ``push_to_device``); a prefill
worker with the device path on writes a request's chunks there (ALLOC -> NIXL WRITE -> COMMIT, the transfer
layer's leases and errors), and:

* on COMMIT the landing claims the chunk's slot (``on_commit``: it can no longer be reused by the receiver) and
  queues its copy into the node's host tier, for reuse by later requests; a background thread makes that copy
  (tier ALLOC, a side-stream device-to-host copy, COMMIT), off the request's path;
* the connector's scheduler half counts landed chunks as ready (:meth:`landed`; the halves share the process in
  vLLM's single-process executor, else the scheduler sees them once their host copy is in the tier);
* the worker half unpacks a landed chunk straight into vLLM's paged blocks (:meth:`unpack`: the unpack kernel,
  Triton on CUDA) before it asks the tier for the others.

Contracts:

* **Who frees.** Only the landing frees a landed slot: once its host copy has ended (done or failed) and a load
  unpacked it, or ``hold_s`` after it landed when no load took it (its bytes are then in the host tier if the
  copy succeeded); never while a copy or an unpack reads it. Slots still leased (a push that never committed)
  are the receiver's: lease + grace, then its reaper.
* **What blocks.** :meth:`unpack` returns after the kernel finished (device synchronized). :meth:`landed` and
  :meth:`has` take one lock and never wait on I/O. The host copy blocks only the landing's thread (each tier
  call bounded by the tier client's timeout).
* **Timeouts and fallbacks.** A chunk that has not landed is simply not ready: the decode leg's
  :class:`~pdmesh.decoder.wait.PushWait` deadline decides when vLLM computes instead. A push that finds every slot
  taken gets ``PoolExhausted`` at ALLOC (a retryable ``TransferFailed`` at the sender), and the prefill side then
  pushes to the decode tier's host pool (``pdmesh.connector.device_push``). A landed chunk whose slot was freed
  before its load loads from the tier, or is recomputed (a load error) if the host copy failed.
* :meth:`close` stops the thread (bounded join), closes the receiver, then the region.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from pdmesh.connector.device_path import StagedChunks, StagePacker, staging_receiver
from pdmesh.transfer.device_staging import StagingRegion
from pdmesh.transfer.nixl_backend import NixlConfig
from pdmesh.transfer.receiver import Receiver, ReceiverConfig

log = logging.getLogger("pdmesh.connector")
DEFAULT_HOLD_S = 30.0

__all__ = ["DEFAULT_HOLD_S", "DeviceLanding", "LandingStats", "landed_in_process", "landing_for"]


class HostTier(Protocol):
    """What the host copy needs of the local tier (``pdmesh.connector.tier_client.ConnectorTierClient``; a client
    of its own: the landing's thread must not share the worker half's connection)."""

    def pool_view(self) -> memoryview: ...

    def alloc(self, keys: Sequence[bytes], nbytes: int) -> list[int | None]: ...

    def commit(self, keys: Sequence[bytes]) -> None: ...

    def abort(self, keys: Sequence[bytes]) -> None: ...


@dataclass
class LandingStats:
    landed: int = 0  # chunks committed into the region
    unpacked: int = 0  # chunks a load unpacked from the region
    host_copies: int = 0  # chunks copied into the host tier (or found there already)
    host_copy_failures: int = 0
    expired: int = 0  # slots freed after hold_s without a load


@dataclass
class _Landed:
    at: float  # time.monotonic when it landed
    copy: str = "queued"  # queued | copying | done | failed
    used: bool = False  # a load unpacked it
    readers: int = 0  # unpacks and host copies reading the slot now


_STOP = b""
_REGISTRY: dict[str, DeviceLanding] = {}
_REGISTRY_LOCK = threading.Lock()


def landing_for(name: str) -> DeviceLanding | None:
    """The landing registered under ``name`` (the connector uses its tier socket) in this process, if any: how
    the scheduler half finds the worker half's landing when vLLM runs both in one process."""
    with _REGISTRY_LOCK:
        return _REGISTRY.get(name)


def landed_in_process(name: str, keys: Sequence[bytes]) -> list[bool]:
    """:meth:`DeviceLanding.landed` of the landing registered as ``name`` here; all False without one."""
    landing = landing_for(name)
    return landing.landed(keys) if landing is not None else [False] * len(keys)


class DeviceLanding:
    def __init__(
        self,
        staged: StagedChunks,
        tier: HostTier | None,
        receiver_config: ReceiverConfig,
        *,
        nixl: NixlConfig | None = None,
        hold_s: float = DEFAULT_HOLD_S,
        advertise_host: str | None = None,
    ) -> None:
        self.staged = staged
        self.staging: StagingRegion = staged.staging
        self.tier = tier
        self.hold_s = hold_s
        self.stats = LandingStats()
        self.address: str | None = None
        self._advertise_host = advertise_host or receiver_config.host
        self._lock = threading.Lock()
        self._landed: dict[bytes, _Landed] = {}
        self._copies: queue.Queue[bytes] = queue.Queue()
        self._pool: torch.Tensor | None = None
        self._pool_view: memoryview | None = None
        self._names: list[str] = []
        self.staging.on_commit = self._on_commit
        self.receiver: Receiver = staging_receiver(self.staging, receiver_config, nixl)
        self._thread = threading.Thread(target=self._run, name="pdmesh-device-landing", daemon=True)

    @classmethod
    def build(
        cls,
        packer: StagePacker,
        blocks_per_chunk: int,
        slots: int,
        tier: HostTier | None,
        receiver_config: ReceiverConfig,
        **kwargs: object,
    ) -> DeviceLanding:
        """A staging region of ``slots`` chunks on the caches' device and a NIXL receiver over it (not started)."""
        staged = StagedChunks.on_device(packer, blocks_per_chunk, slots)
        return cls(staged, tier, receiver_config, **kwargs)  # type: ignore[arg-type]

    def start(self, register_as: str | None = None) -> str:
        """Start the receiver (NIXL's agent and the region's registration: seconds) and the copy thread; returns
        the ``host:port`` prefill workers push to. ``register_as``: make the landing findable by
        :func:`landing_for` under that name."""
        _, port = self.receiver.start()
        self.address = f"{self._advertise_host}:{port}"
        self._thread.start()
        if register_as is not None:
            with _REGISTRY_LOCK:
                _REGISTRY[register_as] = self
            self._names.append(register_as)
        return self.address

    # -- the scheduler half --------------------------------------------------------------------------
    def landed(self, keys: Sequence[bytes]) -> list[bool]:
        """Per key: landed here and not freed yet (a load can unpack it from the region)."""
        with self._lock:
            return [k in self._landed for k in keys]

    def has(self, key: bytes) -> bool:
        with self._lock:
            return key in self._landed

    # -- the worker half -----------------------------------------------------------------------------
    def unpack(self, key: bytes, block_ids: Sequence[int]) -> bool:
        """Unpack landed ``key`` into blocks ``block_ids`` (blocking until the device finished); the slot is freed
        once its host copy has ended too. False, touching nothing, when ``key`` has not landed (or was freed).
        Raises what the kernel raises (the slot is kept for its host copy and freed as usual)."""
        with self._lock:
            entry = self._landed.get(key)
            if entry is None:
                return False
            entry.readers += 1
        ok = False
        try:
            self.staged.unpack_held(key, block_ids)
            ok = True
        finally:
            with self._lock:
                entry.readers -= 1
                if ok:
                    entry.used = True
                    self.stats.unpacked += 1
                self._free_if_done(key, entry, time.monotonic())
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the copy thread (copies still queued are dropped: those chunks are only not reused), close the
        receiver (no more writes), then the region. Idempotent."""
        with _REGISTRY_LOCK:
            for name in self._names:
                if _REGISTRY.get(name) is self:
                    del _REGISTRY[name]
        self._names = []
        if self._thread.is_alive():
            self._copies.put(_STOP)
            self._thread.join(timeout_s)
        self.receiver.close()
        with self._lock:
            self._landed.clear()
        self.staging.close()

    # -- internals -----------------------------------------------------------------------------------
    def _on_commit(self, key: bytes) -> None:
        """The receiver committed ``key`` into its slot: claim it (the region will not free it) and queue its
        host copy. Runs on the receiver's thread; never blocks."""
        if self.staging.acquire(key) is None:
            return
        with self._lock:
            self._landed[key] = _Landed(time.monotonic(), "queued" if self.tier is not None else "failed")
            self.stats.landed += 1
        if self.tier is not None:
            self._copies.put(key)

    def _free_if_done(self, key: bytes, entry: _Landed, now: float) -> None:
        """Under the lock: free the slot when nobody reads it and (its copy ended and it was used, or it has been
        held for ``hold_s``). A queued copy of an expired chunk is skipped."""
        if entry.readers or self._landed.get(key) is not entry:
            return
        copy_ended = entry.copy in ("done", "failed")
        expired = now - entry.at >= self.hold_s
        if (copy_ended and entry.used) or expired:
            del self._landed[key]
            if expired and not entry.used:
                self.stats.expired += 1
            self.staging.release(key)

    def _run(self) -> None:
        while True:
            try:
                key = self._copies.get(timeout=0.25)
            except queue.Empty:
                key = None
            if key == _STOP:
                return
            if key is not None:
                self._host_copy(key)
            now = time.monotonic()
            with self._lock:
                for k, entry in list(self._landed.items()):
                    self._free_if_done(k, entry, now)

    def _pool_tensor(self) -> torch.Tensor:
        assert self.tier is not None
        view = self.tier.pool_view()
        if view is not self._pool_view or self._pool is None:
            self._pool = torch.frombuffer(view, dtype=torch.uint8)
            self._pool_view = view
        return self._pool

    def _host_copy(self, key: bytes) -> None:
        """Copy landed ``key`` into the host tier (ALLOC, side-stream copy, COMMIT); the chunk already being in
        the tier counts as done. Failures are logged and counted (the chunk is then only not reused)."""
        assert self.tier is not None
        with self._lock:
            entry = self._landed.get(key)
            if entry is None or entry.copy != "queued":
                return  # freed (expired) before its turn
            entry.copy = "copying"
            entry.readers += 1
        state, offset = "failed", None
        try:
            n = self.staged.chunk_nbytes
            pool = self._pool_tensor()
            offset = self.tier.alloc([key], n)[0]
            if offset is not None:
                self.staged.copy_to_host(key, pool[offset : offset + n]).wait()
                self.tier.commit([key])
            state = "done"
        except Exception as e:
            log.warning("copying a landed chunk into the host tier failed (%s); it is not kept for reuse", e)
            if offset is not None:
                try:
                    self.tier.abort([key])
                except Exception:
                    pass
        with self._lock:
            entry.copy = state
            entry.readers -= 1
            if state == "done":
                self.stats.host_copies += 1
            else:
                self.stats.host_copy_failures += 1
            self._free_if_done(key, entry, time.monotonic())
