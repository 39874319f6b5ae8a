"""Triton kernel == torch path, byte for byte (Triton interpreter on CPU); GPU checks skip without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pdmesh.kernels import (
    CPU_ATTN,
    FLASH_ATTN_HND,
    chunk_format,
    pack,
    select_impl,
    torch_impl,
    triton_impl,
    unpack,
    vllm_paged_layout,
)
from pdmesh.kernels.layouts import cache_geometry
from tests.kernels.kvhelpers import LAYOUT_CASES, NB, block_bytes, random_caches, reference_pack, same_bytes

pytestmark = pytest.mark.skipif(not triton_impl.HAVE_TRITON, reason="triton is not installed")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize(("layout", "shape"), LAYOUT_CASES, ids=[c[0].name for c in LAYOUT_CASES])
def test_triton_interpreter_matches_torch(layout, shape, dtype):
    src = random_caches(layout, shape, dtype, 2, seed=11)
    ids = [5, 0, 8]  # non-contiguous, not sorted
    a = pack(src, layout, ids, impl="torch")
    b = pack(src, layout, ids, impl="triton")
    assert same_bytes(a, b)
    assert same_bytes(b, reference_pack(src, layout, ids))

    dst_t = random_caches(layout, shape, dtype, 2, seed=12)
    dst_k = [t.clone() for t in dst_t]
    unpack(a, dst_t, layout, [1, 2, 7], impl="torch")
    unpack(b, dst_k, layout, [1, 2, 7], impl="triton")
    for t, k in zip(dst_t, dst_k, strict=True):
        for blk in range(NB):
            assert same_bytes(block_bytes(t, layout, blk), block_bytes(k, layout, blk))


def test_triton_word_sizes_and_tiling():
    """Plane sizes that force 1-, 2-, 4- and 8-byte words, and a plane longer than the capped tile grid."""
    cases = [
        ((NB, 1, 33, 1), torch.float8_e5m2, 1),
        ((NB, 1, 33, 1), torch.float16, 2),
        ((NB, 1, 33, 2), torch.float16, 4),
        ((NB, 3, 32, 2), torch.float32, 8),
        ((NB, 2, 128, 128), torch.float32, 8),  # 256 KiB plane: 128 tiles of 256 words > 64-tile grid cap
    ]
    for shape, dtype, word in cases:
        src = random_caches(CPU_ATTN, shape, dtype, 2, seed=13)
        geo = cache_geometry(CPU_ATTN, src)
        assert (
            triton_impl._word_bytes(
                [src[0].data_ptr(), src[1].data_ptr(), 64, geo.block_stride, geo.plane_nbytes]
            )
            == word
        )
        ids = [3, 7]
        buf = pack(src, CPU_ATTN, ids, impl="triton")
        assert same_bytes(buf, reference_pack(src, CPU_ATTN, ids))
        dst = [torch.zeros_like(t) for t in src]
        unpack(buf, dst, CPU_ATTN, [8, 0], impl="triton")
        assert all(same_bytes(d[[8, 0]], s[ids]) for d, s in zip(dst, src, strict=True))


def test_triton_head_split_planes_and_interleaved_layers():
    """vLLM >= 0.32 BHLNC: layers interleaved inside a block, heads as planes (strided ranges, one launch)."""
    full = torch.randint(-(2**15), 2**15, (NB, 2, 3, 4, 8), dtype=torch.int16).view(
        torch.float16
    )  # [B,H,L,N,C]
    caches = [full[:, :, i] for i in range(3)]
    layout = vllm_paged_layout("BHLNC")
    ids = [4, 1]
    assert same_bytes(pack(caches, layout, ids, impl="triton"), pack(caches, layout, ids, impl="torch"))


def test_torch_ops_branch_matches_numpy_branch():
    """The torch-ops code path (used for GPU tensors) run on CPU tensors gives the same bytes."""
    for layout, shape in LAYOUT_CASES:
        src = random_caches(layout, shape, torch.bfloat16, 2, seed=14)
        geo = cache_geometry(layout, src)
        for ids in ([6, 2, 3], [4, 5]):
            fmt = chunk_format(layout, src, len(ids))
            out = torch.empty(fmt.nbytes, dtype=torch.uint8)
            torch_impl.pack(src, geo, ids, torch.tensor(ids), fmt.view(out), numpy_on_cpu=False)
            assert same_bytes(out, reference_pack(src, layout, ids))
            dst = [torch.zeros_like(t) for t in src]
            torch_impl.unpack(fmt.view(out), dst, geo, ids, torch.tensor(ids), numpy_on_cpu=False)
            assert same_bytes(pack(dst, layout, ids), out)


def test_auto_selects_torch_on_cpu_and_triton_on_cuda():
    assert select_impl(torch.device("cpu")) == "torch"
    assert select_impl(torch.device("cuda", 0)) == "triton"
    assert select_impl(torch.device("cpu"), "triton") == "triton"


def test_standard_triton_interpret_env_runs_the_kernel():
    """The issue's recipe: TRITON_INTERPRET=1 makes triton.jit interpret; the kernel runs unchanged on CPU."""
    code = textwrap.dedent(
        """
        import torch
        from pdmesh.kernels import FLASH_ATTN_NHD, pack
        from pdmesh.kernels import triton_impl
        k = triton_impl._kernel(False)  # the triton.jit kernel, interpreted because of the env var
        assert type(k).__name__ == "InterpretedFunction", type(k)
        caches = [torch.randn(2, 6, 4, 2, 8) for _ in range(2)]
        ids = torch.tensor([4, 1], dtype=torch.int64)
        from pdmesh.kernels.layouts import cache_geometry
        geo = cache_geometry(FLASH_ATTN_NHD, caches)
        out = torch.empty(2 * 2 * 2 * 4 * 2 * 8 * 4, dtype=torch.uint8)
        triton_impl._run(True, caches, geo, ids, out, interpreted=False)
        assert torch.equal(out, pack(caches, FLASH_ATTN_NHD, [4, 1], impl="torch"))
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernel)"
)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("layout", "shape"), LAYOUT_CASES, ids=[c[0].name for c in LAYOUT_CASES])
def test_cuda_triton_matches_torch_and_pinned_destination(layout, shape):
    src = [t.cuda() for t in random_caches(layout, shape, torch.bfloat16, 3, seed=15)]
    ids = [7, 3, 4]
    a = pack(src, layout, ids, impl="torch")
    b = pack(src, layout, ids, impl="triton")
    pinned = torch.empty(a.numel(), dtype=torch.uint8).pin_memory()
    pack(src, layout, ids, out=pinned)  # auto -> triton, writing straight into pinned host memory
    torch.cuda.synchronize()
    assert same_bytes(a.cpu(), b.cpu()) and same_bytes(pinned, a.cpu())
    dst = [torch.zeros_like(t) for t in src]
    unpack(pinned, dst, layout, [0, 1, 2])
    torch.cuda.synchronize()
    assert same_bytes(pack(dst, layout, [0, 1, 2]).cpu(), a.cpu())


@needs_cuda
@pytest.mark.gpu
def test_cuda_hnd_large_planes():
    src = [FLASH_ATTN_HND.empty((2, 64, 16, 8, 128), torch.bfloat16, "cuda").normal_() for _ in range(4)]
    ids = list(range(0, 64, 3))
    assert same_bytes(
        pack(src, FLASH_ATTN_HND, ids, impl="triton").cpu(),
        pack(src, FLASH_ATTN_HND, ids, impl="torch").cpu(),
    )
