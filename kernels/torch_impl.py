"""Torch implementation of pack/unpack (CPU and GPU): per layer and plane, one gather/scatter of whole blocks.

Every (layer, plane) becomes a uint8 view ``[num_blocks, plane_nbytes]`` over the cache's storage (so any dtype,
fp8 included, is moved as raw bytes), and its chunk region ``[n, plane_nbytes]`` is contiguous (layer-major format,
see :mod:`kernels.chunk`). Per layer, one gather (pack) or scatter (unpack) over all planes and blocks; when the
ids are one run of consecutive ids, one strided slice copy instead. On CPU the gather/scatter is numpy's
``take``/fancy assignment on zero-copy views (memcpy per row); on GPU ``index_select``/``index_copy_``.

Synchronous on CPU. On CUDA the copies are queued on the current stream (the caller synchronizes before reading
a host destination). A destination on another device than the caches is staged through a temporary on the
caches' device.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from pdmesh.kernels.layouts import LayerGeometry


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive ids: ``(index_in_chunk, first_block_id, length)``."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == b:
            idx, first, length = runs[-1]
            runs[-1] = (idx, first, length + 1)
        else:
            runs.append((i, b, 1))
    return runs


def plane_views(cache: torch.Tensor, geo: LayerGeometry) -> torch.Tensor:
    """uint8 view ``[num_planes, num_blocks, plane_nbytes]`` of one layer's cache (no copy)."""
    offset = cache.storage_offset() * cache.element_size()
    view = torch.empty(0, dtype=torch.uint8, device=cache.device)
    view.set_(
        cache.untyped_storage(),
        offset,
        (geo.num_planes, geo.num_blocks, geo.plane_nbytes),
        (geo.plane_stride, geo.block_stride, 1),
    )
    return view


def pack(
    caches: Sequence[torch.Tensor],
    geo: LayerGeometry,
    block_ids: Sequence[int],
    ids_tensor: torch.Tensor,
    out4d: torch.Tensor,
    *,
    numpy_on_cpu: bool = True,
    views: CpuViews | None = None,
) -> None:
    """Gather ``block_ids`` (validated, in range) of every layer into ``out4d`` (``[L, P, n, S]`` uint8).
    ``numpy_on_cpu=False`` forces the torch-ops (GPU) code path on CPU tensors (tests)."""
    dev = caches[0].device
    if numpy_on_cpu and dev.type == "cpu" and out4d.device.type == "cpu":
        pack_numpy(views if views is not None else numpy_views(caches, geo), block_ids, out4d.numpy())
        return
    target = out4d if out4d.device == dev else torch.empty(out4d.shape, dtype=torch.uint8, device=dev)
    runs = block_runs(block_ids)
    for layer, cache in enumerate(caches):
        src = plane_views(cache, geo)
        if len(runs) == 1:
            target[layer].copy_(src[:, block_ids[0] : block_ids[0] + len(block_ids)])
        else:
            torch.index_select(src, 1, ids_tensor, out=target[layer])
    if target is not out4d:
        out4d.copy_(target, non_blocking=True)


def unpack(
    buf4d: torch.Tensor,
    caches: Sequence[torch.Tensor],
    geo: LayerGeometry,
    block_ids: Sequence[int],
    ids_tensor: torch.Tensor,
    *,
    numpy_on_cpu: bool = True,
    views: CpuViews | None = None,
) -> None:
    """Scatter ``buf4d`` (``[L, P, n, S]`` uint8) into distinct ``block_ids`` of every layer; other blocks are
    untouched. ``numpy_on_cpu=False`` forces the torch-ops (GPU) code path on CPU tensors (tests)."""
    dev = caches[0].device
    if numpy_on_cpu and dev.type == "cpu" and buf4d.device.type == "cpu":
        unpack_numpy(buf4d.numpy(), views if views is not None else numpy_views(caches, geo), block_ids)
        return
    src4d = buf4d if buf4d.device == dev else buf4d.to(dev, non_blocking=True)
    runs = block_runs(block_ids)
    for layer, cache in enumerate(caches):
        dst = plane_views(cache, geo)
        if len(runs) == 1:
            dst[:, block_ids[0] : block_ids[0] + len(block_ids)].copy_(src4d[layer])
        else:
            dst.index_copy_(1, ids_tensor, src4d[layer])


# CPU: numpy's take / fancy assignment over zero-copy views of the torch storages copy whole rows with memcpy and
# ran at ~memcpy speed here, where torch.index_select reached ~65-85% and index_copy_ ~45% (docs/kernels.md).
# mode="clip" avoids numpy's buffered out= path; ids are validated by the caller.

CpuViews = np.ndarray | list[np.ndarray]


def numpy_views(caches: Sequence[torch.Tensor], geo: LayerGeometry) -> CpuViews:
    """Zero-copy uint8 numpy views of CPU caches, built once per registration.

    When all layers are views of ONE allocation at a uniform layer stride (vLLM >= 0.32 allocates the KV cache
    that way), returns one ``[L, P, NB, S]`` array so pack/unpack is a single numpy call for all layers;
    otherwise a list of per-layer ``[P, NB, S]`` arrays.
    """
    views = [plane_views(c, geo).numpy() for c in caches]
    if len(caches) > 1:
        storage = caches[0].untyped_storage().data_ptr()
        ptrs = [c.data_ptr() for c in caches]
        stride = ptrs[1] - ptrs[0]
        if (
            stride > 0
            and all(c.untyped_storage().data_ptr() == storage for c in caches)
            and all(b - a == stride for a, b in itertools.pairwise(ptrs))
        ):
            v0 = views[0]
            return np.lib.stride_tricks.as_strided(
                v0, shape=(len(views), *v0.shape), strides=(stride, *v0.strides)
            )
    return views


def pack_numpy(views: CpuViews, block_ids: Sequence[int], out: np.ndarray) -> None:
    """Gather ``block_ids`` from numpy ``views`` into ``out`` (``[L, P, n, S]``)."""
    runs = block_runs(block_ids)
    first, n = block_ids[0], len(block_ids)
    ids = np.asarray(block_ids, dtype=np.intp)
    if isinstance(views, np.ndarray):  # all layers in one array
        if len(runs) == 1:
            out[...] = views[:, :, first : first + n]
        else:
            np.take(views, ids, axis=2, out=out, mode="clip")
        return
    for layer, src in enumerate(views):
        if len(runs) == 1:
            out[layer] = src[:, first : first + n]
        else:
            np.take(src, ids, axis=1, out=out[layer], mode="clip")


def unpack_numpy(buf: np.ndarray, views: CpuViews, block_ids: Sequence[int]) -> None:
    """Scatter ``buf`` (``[L, P, n, S]``) into distinct ``block_ids`` of numpy ``views``."""
    runs = block_runs(block_ids)
    first, n = block_ids[0], len(block_ids)
    ids = np.asarray(block_ids, dtype=np.intp)
    if isinstance(views, np.ndarray):
        if len(runs) == 1:
            views[:, :, first : first + n] = buf
        else:
            views[:, :, ids] = buf
        return
    for layer, dst in enumerate(views):
        if len(runs) == 1:
            dst[:, first : first + n] = buf[layer]
        else:
            dst[:, ids] = buf[layer]
