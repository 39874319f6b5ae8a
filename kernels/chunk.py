"""The chunk buffer format: the tier's on-wire and on-disk KV payload (no header; the tier adds its own).

A chunk buffer holds ``n`` blocks (``block_ids`` in the caller's order) of all ``L`` layers, each block of each
layer split into ``P`` planes of ``S`` bytes (see :class:`kernels.layouts.LayerGeometry`), **layer-major**::

    offset(layer l, plane p, i-th block id) = ((l * P + p) * n + i) * S        total = L * P * n * S bytes

i.e. the buffer is a C-contiguous uint8 array ``[L, P, n, S]``. The bytes of a plane are copied verbatim from the
engine's cache (its native inner order and dtype), so the format is identical for the torch and Triton
implementations, on CPU and GPU. Layer-major lets one layer be packed as soon as it is computed (layer-wise
saving) and makes each layer's part one contiguous region (a single gather per layer and plane on CPU).
A chunk is only meaningful with its fingerprint (layout name, dtype, shapes, block size): the tier keeps that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from pdmesh.kernels.errors import KernelError
from pdmesh.kernels.layouts import KVLayout, LayerGeometry, LayoutError, cache_geometry, shape_geometry


class ChunkBufferError(KernelError, ValueError):
    """A chunk buffer has the wrong dtype, size, device or memory layout."""


@dataclass(frozen=True)
class ChunkFormat:
    """Shape of a chunk buffer: ``[num_layers, num_planes, num_blocks, plane_nbytes]`` uint8, C-contiguous."""

    num_layers: int
    num_planes: int
    num_blocks: int
    plane_nbytes: int

    @classmethod
    def of(cls, geometry: LayerGeometry, num_layers: int, num_blocks: int) -> ChunkFormat:
        return cls(num_layers, geometry.num_planes, num_blocks, geometry.plane_nbytes)

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.num_planes * self.num_blocks * self.plane_nbytes

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_planes, self.num_blocks, self.plane_nbytes)

    def offset(self, layer: int, plane: int, index: int) -> int:
        """Byte offset of plane ``plane`` of the ``index``-th block of layer ``layer``."""
        return ((layer * self.num_planes + plane) * self.num_blocks + index) * self.plane_nbytes

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        """The first :attr:`nbytes` of ``buf`` as a ``[L, P, n, S]`` uint8 view (no copy).

        ``buf`` must be a contiguous uint8 tensor (e.g. ``torch.frombuffer`` over shared-memory pool bytes) of at
        least :attr:`nbytes` bytes; raises :class:`ChunkBufferError` otherwise.
        """
        if buf.dtype != torch.uint8:
            raise ChunkBufferError(f"chunk buffer must be uint8, got {buf.dtype}")
        if not buf.is_contiguous():
            raise ChunkBufferError("chunk buffer must be contiguous")
        if buf.numel() < self.nbytes:
            raise ChunkBufferError(f"chunk buffer has {buf.numel()} bytes, needs {self.nbytes}")
        return buf.reshape(-1)[: self.nbytes].view(self.shape)


def _as_list(kv_caches: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(kv_caches, Mapping):
        return list(kv_caches.values())
    return list(kv_caches)


def chunk_format(
    layout: KVLayout,
    kv_caches: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | Sequence[int],
    num_blocks: int,
    *,
    num_layers: int | None = None,
    dtype: torch.dtype | None = None,
) -> ChunkFormat:
    """Chunk format for ``num_blocks`` blocks of these caches.

    ``kv_caches`` is either the per-layer tensors (dict in layer order, or a list), or one layer's logical shape
    (ints) together with ``num_layers`` and ``dtype`` (sizing a pool before the engine exists).
    """
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    items = _as_list(kv_caches) if isinstance(kv_caches, Mapping) else list(kv_caches)
    if items and all(isinstance(x, int) for x in items):
        if num_layers is None or dtype is None:
            raise LayoutError("chunk_format from a shape needs num_layers and dtype")
        geo = shape_geometry(layout, [int(x) for x in items], dtype)
        return ChunkFormat.of(geo, num_layers, num_blocks)
    tensors = [t for t in items if isinstance(t, torch.Tensor)]
    if len(tensors) != len(items):
        raise LayoutError("kv_caches must be tensors or a shape of ints")
    return ChunkFormat.of(cache_geometry(layout, tensors), len(tensors), num_blocks)


def chunk_nbytes(
    layout: KVLayout,
    kv_caches: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | Sequence[int],
    num_blocks: int,
    *,
    num_layers: int | None = None,
    dtype: torch.dtype | None = None,
) -> int:
    """Bytes of a chunk buffer of ``num_blocks`` blocks (see :func:`chunk_format` for the arguments)."""
    return chunk_format(layout, kv_caches, num_blocks, num_layers=num_layers, dtype=dtype).nbytes
