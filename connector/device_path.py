"""The device path of a push: pack on the GPU into a NIXL-registered staging region, write from there, unpack
from the receiving staging region into vLLM's paged blocks (docs/transfer.md, "Device memory").

Pieces (the connector's worker half composes them; what is wired into it and what is not: docs/transfer.md):

* :class:`DevicePathConfig` / :func:`device_path_decision`: the ``kv_connector_extra_config`` flag
  ``device_staging`` (default off) and the rule that turns it on only where it can work: KV caches on CUDA and
  NIXL importable. On CPU the flag is ignored (with the reason logged): pushes go through the host tier pool.
* :class:`StagedChunks`: one engine's bound caches (``pdmesh.kernels.BoundKVCaches``) over a
  :class:`~pdmesh.transfer.device_staging.StagingRegion`: ``pack`` a chunk into a slot (synchronized: NIXL may
  read it as soon as this returns), ``copy_to_host`` the staged bytes into the host tier off the critical path (a
  side CUDA stream; the caller waits on the handle only before committing them to the tier), ``unpack`` a
  received slot into blocks and free it.
* :func:`staging_sender` / :func:`staging_receiver`: a transfer ``Sender`` / ``Receiver`` over a staging region
  with the NIXL backend (which registers it as VRAM or DRAM); the control protocol, leases and errors are the
  transfer layer's, unchanged.

Everything here runs on CPU too (a host staging region registered as NIXL DRAM, the torch or Triton-interpreter
kernels): that is how it is tested on a machine without a GPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from pdmesh.connector.config import ConnectorConfig
from pdmesh.transfer import registry
from pdmesh.transfer.device_staging import StagingRegion
from pdmesh.transfer.nixl_agent import NixlConfig
from pdmesh.transfer.receiver import Receiver, ReceiverConfig
from pdmesh.transfer.registry import BackendOptions
from pdmesh.transfer.sender import Sender, SenderConfig

log = logging.getLogger("pdmesh.connector")


class StagePacker(Protocol):
    """What :class:`StagedChunks` needs of the bound caches (``pdmesh.kernels.BoundKVCaches`` is one)."""

    device: torch.device

    def chunk_nbytes(self, num_blocks: int) -> int: ...

    def pack(self, block_ids: Sequence[int], *, out: torch.Tensor) -> torch.Tensor: ...

    def unpack(self, buf: torch.Tensor, block_ids: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class DevicePathConfig:
    """``enabled``: ``kv_connector_extra_config.device_staging`` (default False); ``slots``:
    ``device_staging_slots``, chunks the staging region holds at once (each ``chunk_nbytes``); ``landing``:
    ``device_landing`` ("host:port" to bind; set on decode workers): the worker also receives pushes into device
    memory (``pdmesh.connector.device_landing``), advertised as ``device_landing_advertise_host`` (default: the
    bind host) and the bound port."""

    enabled: bool = False
    slots: int = 64
    landing: str | None = None
    landing_advertise_host: str | None = None

    @classmethod
    def from_config(cls, config: ConnectorConfig) -> DevicePathConfig:
        """The device path's part of the connector's typed config."""
        return cls(
            config.device_staging,
            config.device_staging_slots,
            config.device_landing,
            config.device_landing_advertise_host,
        )


def device_path_decision(
    config: DevicePathConfig, cache_device: torch.device, nixl_ok: bool | None = None
) -> tuple[bool, str]:
    """Whether the device path is used, and why (for the log). On only when asked for, the caches are on CUDA
    and NIXL imports (``nixl_ok`` None: ask the transfer registry)."""
    if not config.enabled:
        return (
            False,
            "off (kv_connector_extra_config.device_staging is not set): pushes use the host tier pool",
        )
    if cache_device.type != "cuda":
        return (
            False,
            f"off: the KV caches are on {cache_device.type}, not CUDA; pushes use the host tier pool",
        )
    if not (registry.available("nixl") if nixl_ok is None else nixl_ok):
        return False, "off: NIXL is not installed; pushes use the host tier pool"
    return True, f"on: chunks staged in {config.slots} slots of device memory registered with NIXL"


class HostCopy:
    """A copy of a staged chunk into host memory; :meth:`wait` blocks until the bytes are there."""

    def __init__(self, event: Any = None) -> None:
        self._event = event  # a torch.cuda.Event recorded after the copy, or None (already done)

    def done(self) -> bool:
        return self._event is None or bool(self._event.query())

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


class StagedChunks:
    """Pack into and unpack from ``staging`` for the caches bound in ``packer``; a chunk is ``blocks_per_chunk``
    blocks and must fit a staging slot. Slots are keyed by chunk key; see :class:`StagingRegion` for states.
    Blocking calls: :meth:`pack` and :meth:`unpack` return after the device finished (CUDA stream synchronized),
    :meth:`copy_to_host` returns at once (wait on its handle). Not thread-safe per key (one worker thread)."""

    def __init__(self, packer: StagePacker, staging: StagingRegion, blocks_per_chunk: int) -> None:
        self.packer = packer
        self.staging = staging
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_nbytes = packer.chunk_nbytes(blocks_per_chunk)
        if self.chunk_nbytes > staging.slot_bytes:
            raise ValueError(
                f"a chunk ({self.chunk_nbytes} bytes) does not fit a {staging.slot_bytes}-byte slot"
            )
        self._side_stream: Any = None

    @classmethod
    def on_device(cls, packer: StagePacker, blocks_per_chunk: int, slots: int) -> StagedChunks:
        """A new staging region of ``slots`` chunk-sized slots on the caches' device (VRAM on CUDA, DRAM on a
        host), not registered with any transfer backend yet."""
        chunk = packer.chunk_nbytes(blocks_per_chunk)
        return cls(packer, StagingRegion(chunk, slots, str(packer.device)), blocks_per_chunk)

    def _sync(self) -> None:
        for dev in {self.packer.device, self.staging.device}:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

    def pack(self, key: bytes, block_ids: Sequence[int]) -> int | None:
        """Pack blocks ``block_ids`` into a new slot for ``key`` and return its offset in the region (the local
        offset of a ``Chunk`` for :func:`staging_sender`); None when ``key`` is already staged. The slot is ready
        (the bytes complete) on return and stays until :meth:`discard`. Raises PoolExhausted when every slot is
        taken; on any error the slot is freed."""
        if len(block_ids) != self.blocks_per_chunk:
            raise ValueError(f"a chunk is {self.blocks_per_chunk} blocks, got {len(block_ids)}")
        off = self.staging.alloc(key, self.chunk_nbytes, math.inf)
        if off is None:
            return None
        try:
            self.packer.pack(block_ids, out=self.staging.view(key))
            self._sync()  # NIXL reads the slot from another engine: the kernel must have finished
        except BaseException:
            self.staging.abort(key)
            raise
        self.staging.commit(key)
        return off

    def copy_to_host(self, key: bytes, out: torch.Tensor) -> HostCopy:
        """Copy ``key``'s staged bytes into ``out`` (host memory: the tier pool's region for the chunk, at least
        ``chunk_nbytes`` long). On CUDA the copy is queued on a side stream (after the pack) and this returns at
        once: the push does not wait for it; call ``wait()`` on the handle before committing ``out`` to the tier,
        and keep the slot (no :meth:`discard`) until then. On CPU it copies before returning."""
        src = self.staging.view(key)
        dst = out[: src.numel()]
        if src.device.type != "cuda":
            dst.copy_(src)
            return HostCopy()
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(src.device)
        stream = self._side_stream
        stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return HostCopy(event)

    def discard(self, key: bytes) -> None:
        """The staged chunk was written (and copied to the host): free its slot."""
        self.staging.discard(key)

    def unpack(self, key: bytes, block_ids: Sequence[int]) -> bool:
        """Unpack the received chunk ``key`` into blocks ``block_ids`` and free its slot (also on error: vLLM then
        recomputes those blocks). False, touching nothing, when ``key`` is not ready in the region."""
        if len(block_ids) != self.blocks_per_chunk:
            raise ValueError(f"a chunk is {self.blocks_per_chunk} blocks, got {len(block_ids)}")
        view = self.staging.acquire(key)
        if view is None:
            return False
        try:
            self.unpack_held(key, block_ids)
        finally:
            self.staging.release(key)
        return True

    def unpack_held(self, key: bytes, block_ids: Sequence[int]) -> None:
        """Unpack ``key``'s slot into blocks ``block_ids`` without changing the slot's state: for a caller that
        holds the slot (``acquire``d) and frees it itself (``pdmesh.connector.device_landing``). Returns after
        the device finished (the caller may free the slot then). KeyError when ``key`` has no slot."""
        if len(block_ids) != self.blocks_per_chunk:
            raise ValueError(f"a chunk is {self.blocks_per_chunk} blocks, got {len(block_ids)}")
        self.packer.unpack(self.staging.view(key), block_ids)
        self._sync()  # the slot may be reused as soon as the caller frees it


def _one_lane(nixl: NixlConfig | None) -> NixlConfig:
    """Device staging runs one agent: NVLink or RDMA move device memory, where one agent uses every rail and a
    second would register the region twice (lanes split TCP streams: :func:`pdmesh.transfer.nixl_agent.lanes_wanted`)."""
    cfg = nixl or NixlConfig()
    if cfg.lanes is None:
        cfg = replace(cfg, lanes=1)
    return cfg


def _staging_options(fingerprint: str, nixl: NixlConfig | None) -> BackendOptions:
    """The NIXL backend's options on a staging region (one lane unless ``nixl`` sets them)."""
    return BackendOptions(fingerprint, nixl=_one_lane(nixl))


def staging_receiver(
    staging: StagingRegion, config: ReceiverConfig, nixl: NixlConfig | None = None
) -> Receiver:
    """A receiver whose pushes land in ``staging`` over NIXL (registered as the region's VRAM or DRAM). Start it
    with ``start()``; ``close()`` it before closing the region."""
    return Receiver(staging, config, [registry.build("nixl", _staging_options(config.fingerprint, nixl))])


def staging_sender(staging: StagingRegion, config: SenderConfig, nixl: NixlConfig | None = None) -> Sender:
    """A sender pushing chunks staged in ``staging`` (``Chunk.local_offset`` = :meth:`StagedChunks.pack`'s
    offset) over NIXL. ``config.backends`` should be ``("nixl",)``. ``close()`` it before closing the region."""
    return Sender(
        staging.buffer,
        config,
        registry.factories(("nixl",), _staging_options(config.fingerprint, nixl)),
        region=staging.memory_region,
    )
