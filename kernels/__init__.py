"""pdmesh.kernels: pack/unpack of paged KV blocks <-> contiguous chunk buffers (docs/kernels.md).

Folder map: ``layouts`` (where block b of layer l lives, per attention backend), ``chunk`` (the chunk buffer
format), ``api`` (``pack``/``unpack``/``bind`` and the choice of implementation), ``torch_impl`` (CPU and torch
path), ``triton_impl`` (one-launch GPU kernels), ``errors`` (``KernelError``, the package's exception root).

Public surface::

    from pdmesh.kernels import pack, unpack, chunk_nbytes, layout_for, CPU_ATTN
    layout = layout_for("CPU_ATTN", next(iter(kv_caches.values())).shape)
    buf = pack(kv_caches, layout, block_ids, out=pool_view)      # -> uint8 view, chunk format
    unpack(buf, kv_caches, layout, other_block_ids)
    bound = bind(kv_caches, layout)  # validate once at register_kv_caches, then bound.pack(...) / bound.unpack(...)
"""

from pdmesh.kernels.api import BlockIdError, BoundKVCaches, bind, pack, select_impl, unpack
from pdmesh.kernels.chunk import ChunkBufferError, ChunkFormat, chunk_format, chunk_nbytes
from pdmesh.kernels.errors import KernelError
from pdmesh.kernels.layouts import (
    CPU_ATTN,
    FLASH_ATTN_HND,
    FLASH_ATTN_NHD,
    FLASHINFER_HND,
    FLASHINFER_NHD,
    MLA,
    KVLayout,
    LayerGeometry,
    LayoutError,
    all_layouts,
    get_layout,
    layout_for,
    register_layout,
    vllm_paged_layout,
)

__all__ = [
    "CPU_ATTN",
    "FLASHINFER_HND",
    "FLASHINFER_NHD",
    "FLASH_ATTN_HND",
    "FLASH_ATTN_NHD",
    "MLA",
    "BlockIdError",
    "BoundKVCaches",
    "ChunkBufferError",
    "ChunkFormat",
    "KVLayout",
    "KernelError",
    "LayerGeometry",
    "LayoutError",
    "all_layouts",
    "bind",
    "chunk_format",
    "chunk_nbytes",
    "get_layout",
    "layout_for",
    "pack",
    "register_layout",
    "select_impl",
    "unpack",
    "vllm_paged_layout",
]
