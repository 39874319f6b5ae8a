"""Test helpers: build caches in a layout, an independent reference packer, byte comparison."""

from __future__ import annotations

import torch

from pdmesh.kernels import (
    CPU_ATTN,
    FLASH_ATTN_HND,
    FLASH_ATTN_NHD,
    FLASHINFER_HND,
    FLASHINFER_NHD,
    MLA,
    KVLayout,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]

NB = 9  # blocks per layer in test caches
# (layout, per-layer logical shape) with tiny sizes; the block dim has NB entries.
LAYOUT_CASES: list[tuple[KVLayout, tuple[int, ...]]] = [
    (FLASH_ATTN_NHD, (2, NB, 4, 2, 8)),
    (FLASH_ATTN_HND, (2, NB, 4, 2, 8)),
    (FLASHINFER_NHD, (NB, 2, 4, 2, 8)),
    (FLASHINFER_HND, (NB, 2, 4, 2, 8)),
    (CPU_ATTN, (NB, 2, 32, 16)),
    (MLA, (NB, 4, 24)),
]


def random_caches(
    layout: KVLayout, shape: tuple[int, ...], dtype: torch.dtype, num_layers: int, seed: int
) -> list[torch.Tensor]:
    """Per-layer caches in ``layout``'s physical order, filled with random BYTES (any dtype, NaN bit patterns too)."""
    gen = torch.Generator().manual_seed(seed)
    caches = []
    for _ in range(num_layers):
        t = layout.empty(shape, dtype)
        fill_random_bytes(t, gen)
        caches.append(t)
    return caches


def physical(t: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """``t`` permuted to its memory order (a contiguous-strided view), with the permuted dim names."""
    order = layout.stride_order if layout.stride_order is not None else tuple(range(t.dim()))
    return t.permute(*order)


def fill_random_bytes(t: torch.Tensor, gen: torch.Generator) -> None:
    p = physical_any(t)
    raw = torch.randint(0, 256, (p.numel() * p.element_size(),), dtype=torch.uint8, generator=gen)
    p.view(torch.uint8).view(-1).copy_(raw)


def physical_any(t: torch.Tensor) -> torch.Tensor:
    """A contiguous view of ``t``'s dense memory (dims sorted by stride)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    p = t.permute(*order)
    assert p.is_contiguous(), "test tensors are dense"
    return p


def reference_pack(caches: list[torch.Tensor], layout: KVLayout, block_ids: list[int]) -> torch.Tensor:
    """Independent packer: for each layer, plane, block id, the block-plane's bytes in memory order."""
    order = layout.stride_order if layout.stride_order is not None else tuple(range(len(layout.dims)))
    names = [layout.dims[d] for d in order]
    bpos = names.index(layout.block_dim)
    parts = []
    for t in caches:
        p = t.permute(*order)
        planes = p.shape[names.index(layout.plane_dim)] if layout.plane_dim else 1
        for plane in range(planes):
            for b in block_ids:
                x = p.select(bpos, b)
                if layout.plane_dim:
                    ppos = [n for n in names if n != layout.block_dim].index(layout.plane_dim)
                    x = x.select(ppos, plane)
                parts.append(x.contiguous().view(torch.uint8).reshape(-1))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def block_bytes(t: torch.Tensor, layout: KVLayout, b: int) -> torch.Tensor:
    """All bytes of block ``b`` of one layer (every plane), memory order."""
    return reference_pack([t], layout, [b])


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
