"""KV cache layout specs: where block ``b`` of layer ``l`` lives, as strided byte ranges.

A :class:`KVLayout` is a small frozen declaration about ONE layer's KV tensor as an engine hands it out
(e.g. vLLM's ``register_kv_caches``): the names of its logical dims, which dim indexes blocks, which dim (if
any) splits a block into separate *planes* (FlashAttention keeps K and V in two planes far apart), and the
physical (memory) order of the dims. Everything else is read from the tensor's real strides, so the same
declaration works for a contiguous cache, a permuted (HND) one, or a per-layer view into a bigger allocation
(vLLM >= 0.32 can interleave layers per block).

From a tensor, :meth:`KVLayout.geometry` derives a :class:`LayerGeometry`: block ``b``, plane ``p`` of that
layer is the contiguous byte range ``[base + b*block_stride + p*plane_stride, +plane_nbytes)``. The bytes inside
a range are copied verbatim (never reinterpreted), so inner order (NHD vs HND, the CPU backend's tiling) and
dtype (fp32/bf16/fp16/fp8) do not matter to the kernels; they matter only to the layout's *name*, which belongs
in the tier's model fingerprint.

Adding a layout is one declaration, e.g.::

    MY_LAYOUT = register_layout(KVLayout("my_backend", dims=("kv", "block", "token", "head", "dim"),
                                         plane_dim="kv", backends=("MY_BACKEND",)))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdmesh.kernels.errors import KernelError


class LayoutError(KernelError, ValueError):
    """A tensor does not match the layout it was declared with, or no layout fits a (backend, shape)."""


@dataclass(frozen=True)
class LayerGeometry:
    """Byte geometry of one layer: block ``b``, plane ``p`` is ``[base + b*block_stride + p*plane_stride,
    + plane_nbytes)``. All values in bytes except the counts. Identical for all layers of a model."""

    num_blocks: int
    num_planes: int
    block_stride: int
    plane_stride: int
    plane_nbytes: int

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of one layer (all its planes)."""
        return self.num_planes * self.plane_nbytes


@dataclass(frozen=True)
class KVLayout:
    """Declaration of a per-layer paged KV tensor layout.

    Attributes:
        name: stable identifier; goes into the tier's model fingerprint (chunks of different layouts never mix).
        dims: logical dim names of the per-layer tensor, in the tensor's shape order.
        block_dim: the dim that indexes blocks (pages).
        plane_dim: a dim whose entries live apart in memory inside one block (K/V planes of FlashAttention,
            heads of a head-outer layout); ``None`` when a block is one contiguous byte range.
        stride_order: physical order of the logical dims, outermost first (indices into ``dims``);
            ``None`` means identity (shape order == memory order). Only the order *inside* a
            (block, plane) range is checked; block and plane strides are taken from the tensor.
        opaque_block: True when bytes inside a block are not addressable by token (CPU backend tiling):
            only whole blocks may be copied. The kernels always copy whole blocks anyway.
        backends: engine attention-backend names this layout is detected for (see :func:`layout_for`).
    """

    name: str
    dims: tuple[str, ...]
    block_dim: str = "block"
    plane_dim: str | None = None
    stride_order: tuple[int, ...] | None = None
    opaque_block: bool = False
    backends: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.block_dim not in self.dims:
            raise LayoutError(f"{self.name}: block_dim {self.block_dim!r} not in dims {self.dims}")
        if self.plane_dim is not None and (
            self.plane_dim not in self.dims or self.plane_dim == self.block_dim
        ):
            raise LayoutError(f"{self.name}: bad plane_dim {self.plane_dim!r}")
        if self.stride_order is not None and sorted(self.stride_order) != list(range(len(self.dims))):
            raise LayoutError(f"{self.name}: stride_order {self.stride_order} is not a permutation")

    @property
    def ndim(self) -> int:
        return len(self.dims)

    def geometry(self, tensor: torch.Tensor) -> LayerGeometry:
        """Byte geometry of ``tensor`` under this layout. Raises :class:`LayoutError` if the tensor's rank
        does not match or a (block, plane) range is not dense in the declared physical order."""
        if tensor.dim() != self.ndim:
            raise LayoutError(
                f"{self.name}: expected {self.ndim}-d tensor {self.dims}, got shape {tuple(tensor.shape)}"
            )
        esize = tensor.element_size()
        bdim = self.dims.index(self.block_dim)
        pdim = self.dims.index(self.plane_dim) if self.plane_dim is not None else None
        num_planes = tensor.shape[pdim] if pdim is not None else 1
        # The range inside one (block, plane): the remaining dims, in declared physical order.
        order = self.stride_order if self.stride_order is not None else tuple(range(self.ndim))
        inner = [d for d in order if d != bdim and d != pdim]
        expected = 1
        for d in reversed(inner):
            if tensor.shape[d] != 1 and tensor.stride(d) != expected:
                raise LayoutError(
                    f"{self.name}: dim {self.dims[d]!r} has stride {tensor.stride(d)} (elements), expected "
                    f"{expected} for a dense block in order {[self.dims[i] for i in order]}; "
                    f"shape {tuple(tensor.shape)} strides {tensor.stride()}"
                )
            expected *= tensor.shape[d]
        plane_nbytes = expected * esize
        geo = LayerGeometry(
            num_blocks=tensor.shape[bdim],
            num_planes=num_planes,
            block_stride=tensor.stride(bdim) * esize,
            plane_stride=(tensor.stride(pdim) * esize) if pdim is not None else 0,
            plane_nbytes=plane_nbytes,
        )
        if geo.num_blocks > 1 and geo.block_stride < (plane_nbytes if pdim is not None else geo.block_nbytes):
            raise LayoutError(
                f"{self.name}: blocks overlap (block stride {geo.block_stride} B < {plane_nbytes} B)"
            )
        return geo

    def block_shape(self, tensor_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one block of one layer (the tensor's shape without the block dim)."""
        bdim = self.dims.index(self.block_dim)
        return tuple(s for i, s in enumerate(tensor_shape) if i != bdim)

    def empty(
        self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Allocate an uninitialised tensor of logical ``shape`` with this layout's physical order (tests, tools)."""
        if len(shape) != self.ndim:
            raise LayoutError(f"{self.name}: shape {tuple(shape)} has not {self.ndim} dims {self.dims}")
        order = self.stride_order if self.stride_order is not None else tuple(range(self.ndim))
        phys = torch.empty([shape[d] for d in order], dtype=dtype, device=device)
        inverse = [order.index(d) for d in range(self.ndim)]
        return phys.permute(*inverse)


_REGISTRY: dict[str, KVLayout] = {}


def register_layout(layout: KVLayout) -> KVLayout:
    """Add ``layout`` to the name registry used by :func:`get_layout` and :func:`layout_for`; returns it."""
    existing = _REGISTRY.get(layout.name)
    if existing is not None and existing != layout:
        raise LayoutError(f"layout name {layout.name!r} already registered with a different declaration")
    _REGISTRY[layout.name] = layout
    return layout


def get_layout(name: str) -> KVLayout:
    """The registered layout called ``name`` (raises :class:`LayoutError`)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LayoutError(f"unknown layout {name!r}; known: {sorted(_REGISTRY)}") from None


def all_layouts() -> tuple[KVLayout, ...]:
    return tuple(_REGISTRY.values())


_FA_DIMS = ("kv", "block", "token", "head", "dim")
_FI_DIMS = ("block", "kv", "token", "head", "dim")

# vLLM CUDA FlashAttention: [2, NB, BS, H, D]; NHD = contiguous, HND = memory order [2, NB, H, BS, D].
FLASH_ATTN_NHD = register_layout(
    KVLayout("flash_attn_nhd", _FA_DIMS, plane_dim="kv", backends=("FLASH_ATTN", "TRITON_ATTN"))
)
FLASH_ATTN_HND = register_layout(
    KVLayout(
        "flash_attn_hnd", _FA_DIMS, plane_dim="kv", stride_order=(0, 1, 3, 2, 4), backends=("FLASH_ATTN",)
    )
)
# FlashInfer: [NB, 2, BS, H, D]; K and V of a block are adjacent, so a block is one contiguous range.
FLASHINFER_NHD = register_layout(KVLayout("flashinfer_nhd", _FI_DIMS, backends=("FLASHINFER",)))
FLASHINFER_HND = register_layout(
    KVLayout("flashinfer_hnd", _FI_DIMS, stride_order=(0, 1, 3, 2, 4), backends=("FLASHINFER",))
)
# vLLM CPU attention: [NB, H, BS, 2*D] is only a view; K is stored transposed and tiled inside a block.
CPU_ATTN = register_layout(
    KVLayout(
        "cpu_attn",
        ("block", "head", "token", "kv_dim"),
        opaque_block=True,
        backends=("CPU_ATTN", "TORCH_SDPA"),
    )
)
# MLA (DeepSeek latent cache): [NB, BS, kv_lora_rank + rope_dim].
MLA = register_layout(KVLayout("mla", ("block", "token", "dim"), backends=("MLA",)))


# vLLM >= 0.32 (RFC #42082) hands every backend a 4-D per-layer view [B, H, N, C] of a 5-D [L, B, H, N, C]
# allocation whose memory order is named by ``KVCacheLayout`` (e.g. "LBNHC"). Per layer, the order of B, H, N, C
# is what is left after dropping L; when L or H sits between B and the tail, a block is not one range and the
# head dim becomes the plane dim.
def vllm_paged_layout(kv_cache_layout: str) -> KVLayout:
    """The (registered) layout of a vLLM >= 0.32 per-layer view for a ``KVCacheLayout`` name like ``"LBHNC"``."""
    name = kv_cache_layout.upper()
    if sorted(name) != sorted("LBHNC") or name[-1] != "C":
        raise LayoutError(f"not a vLLM KVCacheLayout name: {kv_cache_layout!r}")
    per_layer = [c for c in name if c != "L"]
    order = tuple("BHNC".index(c) for c in per_layer)
    block_compact = set(name[:2]) == {"L", "B"}
    layout = KVLayout(
        f"vllm_{name}",
        ("block", "head", "token", "content"),
        plane_dim=None if block_compact else "head",
        stride_order=order,
        opaque_block=True,
    )
    return register_layout(layout)


for _name in ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"):
    vllm_paged_layout(_name)


def layout_for(backend_name: str, shape: Sequence[int], kv_cache_layout: str | None = None) -> KVLayout:
    """Detect the layout of one layer's KV tensor from the engine's attention backend name and tensor shape.

    ``kv_cache_layout`` is vLLM's resolved ``KVCacheLayout`` name (vLLM >= 0.32) or ``"NHD"``/``"HND"``; when
    given with a 4-D shape on a non-CPU backend it selects the standardized per-layer view layout. Raises
    :class:`LayoutError` when nothing fits (never guesses between layouts that would give different bytes).
    """
    b = backend_name.upper()
    hint = kv_cache_layout.upper() if kv_cache_layout is not None else None
    if len(shape) == 4 and hint is not None and hint not in ("NHD", "HND") and not b.startswith("CPU"):
        return vllm_paged_layout(hint)
    candidates = [
        lay
        for lay in _REGISTRY.values()
        if lay.ndim == len(shape)
        and (b in lay.backends or ("MLA" in b and "MLA" in lay.backends))
        and ("kv" not in lay.dims or shape[lay.dims.index("kv")] == 2)
    ]
    if len(candidates) > 1:  # NHD/HND twins: the engine's layout name decides, NHD by default
        want_hnd = hint == "HND"
        candidates = [lay for lay in candidates if lay.name.endswith("_hnd") == want_hnd]
    if len(candidates) == 1:
        return candidates[0]
    raise LayoutError(
        f"no unique layout for backend {backend_name!r} with shape {tuple(shape)} "
        f"(kv_cache_layout={kv_cache_layout!r}, candidates {[c.name for c in candidates]}); "
        "declare one with register_layout()"
    )


def cache_geometry(layout: KVLayout, kv_caches: Sequence[torch.Tensor]) -> LayerGeometry:
    """The common geometry of all layers; raises :class:`LayoutError` if layers differ or are not on one device."""
    if not kv_caches:
        raise LayoutError("kv_caches is empty")
    geo = layout.geometry(kv_caches[0])
    dev = kv_caches[0].device
    for i, t in enumerate(kv_caches[1:], start=1):
        g = layout.geometry(t)
        if g != geo:
            raise LayoutError(f"layer {i} geometry {g} differs from layer 0 {geo}")
        if t.device != dev:
            raise LayoutError(f"layer {i} is on {t.device}, layer 0 on {dev}")
    return geo


def shape_geometry(layout: KVLayout, shape: Sequence[int], dtype: torch.dtype) -> LayerGeometry:
    """Geometry of a densely allocated tensor of ``shape`` (without allocating it)."""
    meta = layout.empty(shape, dtype, device="meta")
    return layout.geometry(meta)


__all__ = [
    "CPU_ATTN",
    "FLASHINFER_HND",
    "FLASHINFER_NHD",
    "FLASH_ATTN_HND",
    "FLASH_ATTN_NHD",
    "MLA",
    "KVLayout",
    "LayerGeometry",
    "LayoutError",
    "all_layouts",
    "cache_geometry",
    "get_layout",
    "layout_for",
    "register_layout",
    "shape_geometry",
    "vllm_paged_layout",
]
