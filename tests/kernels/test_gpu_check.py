"""bench/gpu_check.sh and bench/bench_gpu.py without a GPU: the no-CUDA refusal, the CPU smoke path end to end
(Triton interpreter), and that the bit-exactness checks they rely on catch a wrong byte or a stray write."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pdmesh.kernels import FLASH_ATTN_NHD, torch_impl, triton_impl
from tests.kernels.bitexact import LayoutCase, all_cases, check_case
from tests.kernels.kvhelpers import NB

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"
no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
needs_triton = pytest.mark.skipif(not triton_impl.HAVE_TRITON, reason="triton is not installed")


def _bench_gpu() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "bench_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _run_script(*args: str, out: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=150, cwd="/"
    )


@no_cuda_here
def test_gpu_check_fails_fast_and_clearly_without_cuda(tmp_path: Path) -> None:
    res = _run_script(out=tmp_path)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "no CUDA" in res.stderr and "FAILED: versions" in res.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is written when the machine has no GPU"


@needs_triton
def test_gpu_check_cpu_smoke_end_to_end(tmp_path: Path) -> None:
    """The whole script on tiny shapes: versions, the pytest step, bench_gpu.py --cpu-smoke writing $OUT."""
    res = _run_script("--cpu-smoke", out=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "kernel tests (pytest)" in res.stdout and "passed in" in res.stdout
    doc = json.loads((tmp_path / "gpu-smoke.json").read_text())
    assert doc["smoke"] is True and doc["goal_met"] is None
    assert doc["bit_exact"]["ok"] and doc["bit_exact"]["cases"] >= 16 and not doc["bit_exact"]["failures"]
    layouts = {r["layout"] for r in doc["results"]}
    assert {"flash_attn_nhd", "flash_attn_hnd", "vllm_BHLNC", "mla"} <= layouts
    for row in doc["results"]:
        assert row["bit_exact"], row
        assert row["pack_GBps"] >= 0 and row["chunk_bytes"] > 0
        if row["impl"] == "triton":
            assert "pack_kernel_GBps" in row and "unpack_kernel_vs_memcpy" in row


def test_bench_gpu_arguments_and_output_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bench = _bench_gpu()
    args = bench.parse_args(["--cpu-smoke", "--reps", "3", "--out", str(tmp_path / "x.json")])
    assert args.cpu_smoke and args.reps == 3 and args.out == tmp_path / "x.json" and not args.check_only
    with pytest.raises(SystemExit):
        bench.parse_args(["--iters", "0"])
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench.default_out(smoke=False) == tmp_path / "gpu.json"
    monkeypatch.delenv("OUT")
    assert bench.default_out(smoke=False) == REPO / "bench" / "results" / "gpu.json"
    assert bench.default_out(smoke=True).name == "gpu-smoke.json"
    # in a fresh interpreter: this test process may have loaded vLLM or NIXL for other tests
    probe = (
        "import importlib.util, sys; s = importlib.util.spec_from_file_location('bench_gpu', sys.argv[1]); "
        "m = importlib.util.module_from_spec(s); sys.modules['bench_gpu'] = m; s.loader.exec_module(m); "
        "print(m.forbidden_modules())"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe, str(REPO / "bench" / "bench_gpu.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]", "importing pdmesh.kernels must not load vLLM or NIXL"
    real = [c for c in bench.plan(smoke=False) if c.impl == "triton"]
    assert {c.layout_name for c in real} >= {"flash_attn_nhd", "flash_attn_hnd", "flashinfer_nhd", "mla"}
    assert {c.model.name for c in real} == {"llama3-8b", "qwen2.5-0.5b", "deepseek-v2-lite-mla"}
    assert any(c.destination == "pinned" for c in real)


@no_cuda_here
def test_bench_gpu_refuses_without_cuda(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _bench_gpu().main([]) == 3
    assert "no CUDA" in capsys.readouterr().err


@needs_triton
def test_harness_catches_a_wrong_byte_and_a_stray_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks gpu_check relies on can fail: a flipped chunk byte, an unpack that also writes another block."""
    case = LayoutCase(FLASH_ATTN_NHD, (2, NB, 4, 2, 8), torch.bfloat16)
    assert check_case(case, "cpu", impl="triton") > 0
    real_pack, real_unpack = triton_impl.pack, triton_impl.unpack

    def flipping_pack(caches, geo, ids, buf):  # type: ignore[no-untyped-def]
        real_pack(caches, geo, ids, buf)
        flat = buf.reshape(-1)
        flat[-1] = flat[-1] ^ 1

    monkeypatch.setattr(triton_impl, "pack", flipping_pack)
    with pytest.raises(AssertionError, match="differs from the reference"):
        check_case(case, "cpu", impl="triton")
    monkeypatch.setattr(triton_impl, "pack", real_pack)

    def straying_unpack(buf, caches, geo, ids):  # type: ignore[no-untyped-def]
        real_unpack(buf, caches, geo, ids)
        spare = min(set(range(geo.num_blocks)) - set(ids.tolist()))
        view = torch_impl.plane_views(caches[-1], geo)
        view[0, spare, 0] = view[0, spare, 0] ^ 1

    monkeypatch.setattr(triton_impl, "unpack", straying_unpack)
    with pytest.raises(AssertionError, match="untouched layer 2 block"):
        check_case(case, "cpu", impl="triton")


def test_bench_row_catches_a_stray_unpack_write(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench_gpu()
    case = bench.BenchCase(
        bench.SMOKE, "flash_attn_nhd", impl="torch", block_size=4, tokens=16, pool_blocks=8
    )
    cpu = torch.device("cpu")
    assert bench.run_row(case, cpu, bench.Timer(cpu), 1, 1)["bit_exact"]
    real = torch_impl.unpack_numpy

    def straying(buf, views, block_ids):  # type: ignore[no-untyped-def]
        real(buf, views, block_ids)
        spare = min(set(range(case.pool_blocks)) - set(block_ids))
        views[0][0, spare, 0] ^= 1

    monkeypatch.setattr(torch_impl, "unpack_numpy", straying)
    row = bench.run_row(case, cpu, bench.Timer(cpu), 1, 1)
    assert row["bit_exact"] is False
    assert row["bit_exact_failures"] == ["unpack changed blocks it was not given"]


def test_every_layout_and_dtype_is_a_cuda_case() -> None:
    """The CUDA test matrix covers every registered layout family x every dtype of the torch tests."""
    cases = all_cases()
    names = {c.layout.name for c in cases}
    assert {
        "flash_attn_nhd",
        "flash_attn_hnd",
        "flashinfer_nhd",
        "flashinfer_hnd",
        "cpu_attn",
        "mla",
    } <= names
    assert {f"vllm_{o}" for o in ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")} <= names
    assert len(cases) == len(names) * 5 == len({c.id for c in cases})
