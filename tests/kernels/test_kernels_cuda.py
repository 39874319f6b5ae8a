"""CUDA: the compiled Triton kernel (and the torch path) bit-exact for every layout x dtype, on the device.

Every case of ``bitexact.all_cases()`` (the six layouts of ``kvhelpers.LAYOUT_CASES`` plus the six vLLM >= 0.32
memory orders, times fp32/bf16/fp16/fp8 e4m3/fp8 e5m2) runs :func:`bitexact.check_case` on ``cuda``: pack on the
device == the CPU reference packer == the torch path == pack into pinned host memory; unpack into other block ids
(from device and from pinned memory) leaves every other block unchanged. Skips with a reason without CUDA or
Triton; ``bench/gpu_check.sh`` runs it on GPU machines and fails if anything here skipped.
"""

from __future__ import annotations

import pytest
import torch

from pdmesh.kernels import triton_impl
from tests.kernels.bitexact import LayoutCase, all_cases, check_case

CASES = all_cases()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not triton_impl.HAVE_TRITON, reason="triton is not installed"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernel)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cuda_triton_bit_exact_every_layout_and_dtype(case: LayoutCase) -> None:
    assert check_case(case, "cuda", impl="triton") > 0


@pytest.mark.parametrize("case", all_cases([torch.bfloat16, torch.float8_e4m3fn]), ids=lambda c: c.id)
def test_cuda_torch_path_bit_exact(case: LayoutCase) -> None:
    assert check_case(case, "cuda", impl="torch") > 0
