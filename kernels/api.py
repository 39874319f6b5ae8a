"""pack / unpack: move whole KV blocks of all layers between an engine's paged cache and one chunk buffer.

Contracts (both functions):
- ``kv_caches``: the per-layer tensors in layer order (vLLM's ``register_kv_caches`` dict, or a list), all with
  the same geometry under ``layout`` and on one device. They are read (pack) or written (unpack) in place.
- ``block_ids``: block indices (list/tuple of ints, or an int tensor), any order, non-contiguous allowed,
  each in ``[0, num_blocks)``; for unpack they must be distinct. Validated on the host before any copy.
- The chunk buffer is a contiguous uint8 tensor in the format of :mod:`kernels.chunk` (layer-major
  ``[L, P, n, S]``); it may be longer than needed (only the first ``chunk_nbytes`` bytes are used).
- Implementation: ``impl="auto"`` picks Triton for CUDA caches (when Triton is importable) and torch otherwise;
  both write identical bytes. ``"torch"`` / ``"triton"`` force one (Triton on CPU caches runs the interpreter).
- Synchronous for CPU caches. For CUDA caches the work is queued on the current stream: synchronize before the
  host reads a packed buffer or before the buffer's memory is reused after unpack.
- Errors are typed: :class:`~kernels.layouts.LayoutError`, :class:`~kernels.chunk.ChunkBufferError`,
  :class:`BlockIdError`; nothing is written when validation fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from kernels import torch_impl, triton_impl
from kernels.chunk import ChunkBufferError, ChunkFormat
from kernels.layouts import KVLayout, LayerGeometry, cache_geometry

Impl = Literal["auto", "torch", "triton"]
Caches = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
BlockIds = Sequence[int] | torch.Tensor


class BlockIdError(IndexError):
    """A block id is out of range, or (unpack) repeated."""


def select_impl(device: torch.device, impl: Impl = "auto") -> Literal["torch", "triton"]:
    """The implementation ``impl`` resolves to for caches on ``device``."""
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_impl.HAVE_TRITON else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "triton" and not triton_impl.HAVE_TRITON:
        raise triton_impl.TritonUnavailable("triton is not installed")
    return impl


def _prepare(
    layout: KVLayout, kv_caches: Caches, block_ids: BlockIds, unique: bool
) -> tuple[list[torch.Tensor], LayerGeometry, list[int], torch.Tensor]:
    caches = list(kv_caches.values()) if isinstance(kv_caches, Mapping) else list(kv_caches)
    geo = cache_geometry(layout, caches)
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dtype.is_floating_point or block_ids.dim() > 1:
            raise BlockIdError("block_ids must be a 1-d integer tensor")
        ids = [int(b) for b in block_ids.cpu().tolist()]
    else:
        ids = [int(b) for b in block_ids]
    if ids and (min(ids) < 0 or max(ids) >= geo.num_blocks):
        raise BlockIdError(f"block ids must be in [0, {geo.num_blocks}), got min {min(ids)} max {max(ids)}")
    if unique and len(set(ids)) != len(ids):
        raise BlockIdError("unpack block_ids must be distinct")
    ids_tensor = torch.tensor(ids, dtype=torch.int64)
    dev = caches[0].device
    if dev.type != "cpu":
        ids_tensor = ids_tensor.pin_memory().to(dev, non_blocking=True)
    return caches, geo, ids, ids_tensor


def pack(
    kv_caches: Caches,
    layout: KVLayout,
    block_ids: BlockIds,
    out: torch.Tensor | None = None,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Copy blocks ``block_ids`` of every layer into one chunk buffer and return it.

    ``out``: preallocated contiguous uint8 destination of at least ``chunk_nbytes`` bytes (pool memory via
    ``torch.frombuffer``, pinned host memory, device memory); when None a buffer is allocated on the caches'
    device. Returns the ``chunk_nbytes``-long flat uint8 view of the destination that was written.
    """
    caches, geo, ids, ids_tensor = _prepare(layout, kv_caches, block_ids, unique=False)
    fmt = ChunkFormat.of(geo, len(caches), len(ids))
    if out is None:
        out = torch.empty(fmt.nbytes, dtype=torch.uint8, device=caches[0].device)
    out4d = fmt.view(out)
    if not ids:
        return out4d.reshape(-1)
    chosen = select_impl(caches[0].device, impl)
    if chosen == "triton" and _device_accessible(out, caches[0].device):
        triton_impl.pack(caches, geo, ids_tensor, out4d)
    elif chosen == "triton":
        tmp = torch.empty(fmt.nbytes, dtype=torch.uint8, device=caches[0].device)
        triton_impl.pack(caches, geo, ids_tensor, tmp)
        out4d.reshape(-1).copy_(tmp, non_blocking=True)
    else:
        torch_impl.pack(caches, geo, ids, ids_tensor, out4d)
    return out4d.reshape(-1)


def unpack(
    buf: torch.Tensor,
    kv_caches: Caches,
    layout: KVLayout,
    block_ids: BlockIds,
    *,
    impl: Impl = "auto",
) -> None:
    """Copy a chunk buffer (as written by :func:`pack` for the same layout, shapes and number of blocks) into
    blocks ``block_ids`` of every layer. Blocks not listed are not touched. ``block_ids`` may differ from the ids
    the chunk was packed from (another request, another engine)."""
    caches, geo, ids, ids_tensor = _prepare(layout, kv_caches, block_ids, unique=True)
    fmt = ChunkFormat.of(geo, len(caches), len(ids))
    buf4d = fmt.view(buf)
    if not ids:
        return
    chosen = select_impl(caches[0].device, impl)
    if chosen == "triton":
        src = (
            buf4d
            if _device_accessible(buf, caches[0].device)
            else buf4d.to(caches[0].device, non_blocking=True)
        )
        triton_impl.unpack(src, caches, geo, ids_tensor)
    else:
        torch_impl.unpack(buf4d, caches, geo, ids, ids_tensor)


def _device_accessible(buf: torch.Tensor, device: torch.device) -> bool:
    """True when a kernel on ``device`` can address ``buf`` directly (same device, or pinned host for CUDA)."""
    if buf.device == device:
        return True
    return device.type == "cuda" and buf.device.type == "cpu" and buf.is_pinned()


__all__ = ["BlockIdError", "ChunkBufferError", "pack", "select_impl", "unpack"]
