"""What ``bench/bench_gpu.py`` measures: model KV shapes, the benchmark rows (:func:`plan`) and the caches a row
packs from and unpacks into (random bytes in each layout's memory order). torch only; the kernels' layouts come from
``pdmesh.kernels`` (the caller puts the repository root on ``sys.path``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """KV shape of a model: ``head_dim`` is the per-token width of one head (MLA: the latent width)."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


LLAMA3_8B = ModelShape("llama3-8b", 32, 8, 128, torch.bfloat16)
QWEN25_05B = ModelShape("qwen2.5-0.5b", 24, 2, 64, torch.bfloat16)  # bench/bench_ttft.py QWEN_SHAPE
DEEPSEEK_V2_LITE = ModelShape(
    "deepseek-v2-lite-mla", 27, 1, 576, torch.bfloat16
)  # kv_lora_rank 512 + rope 64
SMOKE = ModelShape("smoke-tiny", 2, 2, 8, torch.bfloat16)


@dataclass(frozen=True)
class BenchCase:
    """One benchmark row: ``destination`` is ``"device"`` or ``"pinned"`` (host memory the kernel addresses)."""

    model: ModelShape
    layout_name: str
    destination: str = "device"
    impl: str = "triton"
    block_size: int = 16
    tokens: int = 256
    pool_blocks: int = 1024


def plan(smoke: bool) -> list[BenchCase]:
    """The rows to measure."""
    if smoke:
        kw = {"block_size": 4, "tokens": 16, "pool_blocks": 8}
        return [
            BenchCase(SMOKE, "flash_attn_nhd", **kw),
            BenchCase(SMOKE, "flash_attn_hnd", **kw),
            BenchCase(SMOKE, "vllm_BHLNC", **kw),
            BenchCase(SMOKE, "mla", **kw),
            BenchCase(SMOKE, "flash_attn_nhd", impl="torch", **kw),
        ]
    rows = [
        BenchCase(LLAMA3_8B, name)
        for name in (
            "flash_attn_nhd",
            "flash_attn_hnd",
            "flashinfer_nhd",
            "flashinfer_hnd",
            "vllm_LBNHC",
            "vllm_BLNHC",
            "vllm_BHLNC",
        )
    ]
    rows += [
        BenchCase(LLAMA3_8B, "flash_attn_nhd", impl="torch"),
        BenchCase(LLAMA3_8B, "flash_attn_nhd", destination="pinned"),
        BenchCase(LLAMA3_8B, "flash_attn_hnd", destination="pinned"),
    ]
    q = {"pool_blocks": 2048}
    rows += [
        BenchCase(QWEN25_05B, name, **q)
        for name in ("flash_attn_nhd", "flash_attn_hnd", "flashinfer_nhd", "vllm_BLNHC")
    ]
    rows += [BenchCase(QWEN25_05B, "flash_attn_nhd", destination="pinned", **q)]
    rows += [BenchCase(DEEPSEEK_V2_LITE, "mla"), BenchCase(DEEPSEEK_V2_LITE, "mla", destination="pinned")]
    return rows


def alloc_caches(case: BenchCase, device: torch.device, seed: int) -> list[torch.Tensor]:
    """Per-layer caches of ``case`` filled with random bytes. FlashAttention/FlashInfer/MLA: one tensor per layer
    in the layout's memory order; ``vllm_<ORDER>``: views of one ``[L, B, H, N, C]`` allocation (C = K|V, 2 x head)."""
    from pdmesh.kernels import get_layout

    m = case.model
    gen = torch.Generator(device=device).manual_seed(seed)

    def random_tensor(phys_shape: list[int]) -> torch.Tensor:
        n = m.dtype.itemsize
        for s in phys_shape:
            n *= s
        raw = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device, generator=gen)
        return raw.view(m.dtype).view(phys_shape)

    nb, bs, h, d = case.pool_blocks, case.block_size, m.kv_heads, m.head_dim
    if case.layout_name.startswith("vllm_"):
        order_name = case.layout_name.removeprefix("vllm_")
        logical = (m.layers, nb, h, bs, 2 * d)
        order = ["LBHNC".index(ch) for ch in order_name]
        full = random_tensor([logical[i] for i in order]).permute(*[order.index(i) for i in range(5)])
        return [full[i] for i in range(m.layers)]
    layout = get_layout(case.layout_name)
    if case.layout_name.startswith("flash_attn"):
        shape: tuple[int, ...] = (2, nb, bs, h, d)
    elif case.layout_name.startswith("flashinfer"):
        shape = (nb, 2, bs, h, d)
    elif case.layout_name == "mla":
        shape = (nb, bs, d)
    else:
        raise ValueError(f"no benchmark shape for layout {case.layout_name}")
    order = list(layout.stride_order or range(layout.ndim))
    inverse = [order.index(i) for i in range(layout.ndim)]
    return [random_tensor([shape[i] for i in order]).permute(*inverse) for _ in range(m.layers)]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN patterns included), on whatever device ``a`` is."""
    a = a.contiguous().view(torch.uint8)
    b = b.contiguous().view(torch.uint8).to(a.device)
    return a.shape == b.shape and torch.equal(a, b)
