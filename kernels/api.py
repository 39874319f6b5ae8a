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

from pdmesh.kernels import torch_impl, triton_impl
from pdmesh.kernels.chunk import ChunkBufferError, ChunkFormat
from pdmesh.kernels.errors import KernelError
from pdmesh.kernels.layouts import KVLayout, LayerGeometry, cache_geometry

Impl = Literal["auto", "torch", "triton"]
Caches = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
BlockIds = Sequence[int] | torch.Tensor


class BlockIdError(KernelError, IndexError):
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


def _as_list(kv_caches: Caches) -> list[torch.Tensor]:
    return list(kv_caches.values()) if isinstance(kv_caches, Mapping) else list(kv_caches)


class BoundKVCaches:
    """An engine's KV caches validated against a layout once, for repeated pack/unpack.

    Build it when the engine registers its caches (``register_kv_caches``); it keeps references to the tensors
    (never copies or frees them) and, on CPU, zero-copy numpy views of them. The tensors must not be
    reallocated while bound. Same contracts as :func:`pack` / :func:`unpack`.
    """

    def __init__(self, kv_caches: Caches, layout: KVLayout) -> None:
        self.layout = layout
        self.caches = _as_list(kv_caches)
        self.geometry: LayerGeometry = cache_geometry(layout, self.caches)
        self.device = self.caches[0].device
        self._views = (
            torch_impl.numpy_views(self.caches, self.geometry) if self.device.type == "cpu" else None
        )

    @property
    def num_layers(self) -> int:
        return len(self.caches)

    def chunk_format(self, num_blocks: int) -> ChunkFormat:
        return ChunkFormat.of(self.geometry, self.num_layers, num_blocks)

    def chunk_nbytes(self, num_blocks: int) -> int:
        return self.chunk_format(num_blocks).nbytes

    def _ids(self, block_ids: BlockIds, unique: bool) -> list[int]:
        if isinstance(block_ids, torch.Tensor):
            if block_ids.dtype.is_floating_point or block_ids.dim() > 1:
                raise BlockIdError("block_ids must be a 1-d integer tensor")
            ids = [int(b) for b in block_ids.cpu().tolist()]
        else:
            ids = [int(b) for b in block_ids]
        nb = self.geometry.num_blocks
        if ids and (min(ids) < 0 or max(ids) >= nb):
            raise BlockIdError(f"block ids must be in [0, {nb}), got min {min(ids)} max {max(ids)}")
        if unique and len(set(ids)) != len(ids):
            raise BlockIdError("unpack block_ids must be distinct")
        return ids

    def _ids_tensor(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.int64)
        if self.device.type != "cpu":
            t = t.to(self.device, non_blocking=True)
        return t

    def pack(
        self, block_ids: BlockIds, out: torch.Tensor | None = None, *, impl: Impl = "auto"
    ) -> torch.Tensor:
        """See :func:`pack`."""
        ids = self._ids(block_ids, unique=False)
        fmt = self.chunk_format(len(ids))
        if out is None:
            out = torch.empty(fmt.nbytes, dtype=torch.uint8, device=self.device)
        out4d = fmt.view(out)
        if not ids:
            return out4d.reshape(-1)
        chosen = select_impl(self.device, impl)
        if chosen == "torch" and self.device.type == "cpu" and out.device.type == "cpu":
            torch_impl.pack_numpy(self._views, ids, out4d.numpy())  # type: ignore[arg-type]
        elif chosen == "torch":
            torch_impl.pack(self.caches, self.geometry, ids, self._ids_tensor(ids), out4d)
        elif _device_accessible(out, self.device):
            triton_impl.pack(self.caches, self.geometry, self._ids_tensor(ids), out4d)
        else:
            tmp = torch.empty(fmt.nbytes, dtype=torch.uint8, device=self.device)
            triton_impl.pack(self.caches, self.geometry, self._ids_tensor(ids), tmp)
            out4d.reshape(-1).copy_(tmp, non_blocking=True)
        return out4d.reshape(-1)

    def unpack(self, buf: torch.Tensor, block_ids: BlockIds, *, impl: Impl = "auto") -> None:
        """See :func:`unpack`."""
        ids = self._ids(block_ids, unique=True)
        buf4d = self.chunk_format(len(ids)).view(buf)
        if not ids:
            return
        chosen = select_impl(self.device, impl)
        if chosen == "torch" and self.device.type == "cpu" and buf.device.type == "cpu":
            torch_impl.unpack_numpy(buf4d.numpy(), self._views, ids)  # type: ignore[arg-type]
        elif chosen == "torch":
            torch_impl.unpack(buf4d, self.caches, self.geometry, ids, self._ids_tensor(ids))
        else:
            src = buf4d if _device_accessible(buf, self.device) else buf4d.to(self.device, non_blocking=True)
            triton_impl.unpack(src, self.caches, self.geometry, self._ids_tensor(ids))


def bind(kv_caches: Caches, layout: KVLayout) -> BoundKVCaches:
    """Validate ``kv_caches`` against ``layout`` once (raises LayoutError) for repeated pack/unpack."""
    return BoundKVCaches(kv_caches, layout)


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
    One-shot form of ``bind(kv_caches, layout).pack(...)`` (which skips re-validating the caches).
    """
    return BoundKVCaches(kv_caches, layout).pack(block_ids, out, impl=impl)


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
    BoundKVCaches(kv_caches, layout).unpack(buf, block_ids, impl=impl)


def _device_accessible(buf: torch.Tensor, device: torch.device) -> bool:
    """True when a kernel on ``device`` can address ``buf`` directly (same device, or pinned host for CUDA)."""
    if buf.device == device:
        return True
    return device.type == "cuda" and buf.device.type == "cpu" and buf.is_pinned()


__all__ = ["BlockIdError", "BoundKVCaches", "ChunkBufferError", "bind", "pack", "select_impl", "unpack"]
