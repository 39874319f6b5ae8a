"""TTFT cold vs warm (tier hit in memory, disk, remote) at long contexts, and push vs stock NIXL PD, in one run.

A random model with the shape of Qwen2.5-0.5B (24 layers, hidden 896, 14 heads, 2 KV heads, head dim 64,
intermediate 4864; our 3k-token vocabulary) in bf16, served by vLLM in its default multiprocess mode, behind the
pdmesh router as 1 prefill + 1 decode worker. vLLM's own prefix cache is off so that every warm hit comes from
the pdmesh tier; each prompt is new token ids of exactly ``--tokens`` tokens.

- cold: a prompt nobody has seen (prefill computes all of it, pushes the chunks, decode loads them);
- warm memory: the same prompt again (prefill loads it from its tier's memory pool);
- warm disk: the memory tiers cleared first (chunks come back from the disk tier);
- warm remote: memory and disk cleared (chunks come from the shared cache server);
- nixl cold: the same kind of prompt through a stock NixlConnector cluster (pull), for comparison.

TTFT = time from sending a streaming request to the router until its first token arrives.

    python bench/bench_ttft.py [--tokens 8192] [--reps 2] [--quick]

Writes bench/results/ttft.json and ttft.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmesh.cluster import ClusterSpec, LocalCluster
from pdmesh.modelgen import TinyModelSpec, make_model
from pdmesh.procs import free_port
from pdmesh.security import TOKEN_HEADER, cluster_token_from_env

RESULTS = Path(__file__).resolve().parent / "results"
QWEN_SHAPE = TinyModelSpec(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=32768,
    seed=1,
)
TINY_SHAPE = TinyModelSpec(max_position_embeddings=32768)
MODEL = "bench-model"


def ttft(url: str, prompt: list[int]) -> float:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600, trust_env=False) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def clear_tiers(cluster: LocalCluster, tiers: list[str]) -> None:
    for worker in cluster.workers:
        info = cluster.tier_info(worker)
        r = httpx.post(
            info["http"] + "/clear",
            json={"tiers": tiers},
            headers={TOKEN_HEADER: cluster_token_from_env()},
            timeout=30,
        )
        r.raise_for_status()


def tier_stats(cluster: LocalCluster, worker: str) -> dict:
    http = cluster.tier_info(worker)["http"]
    return httpx.get(http + "/stats", headers={TOKEN_HEADER: cluster_token_from_env()}, timeout=10).json()


def wait_written_through(cluster: LocalCluster, worker: str, before: dict, timeout: float = 120.0) -> None:
    """Block until every chunk the worker's tier gained since ``before`` is on disk and on the remote tier."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = tier_stats(cluster, worker)
        new = st["memory"]["ready"] - before["memory"]["ready"]
        disk = st["disk"]["writes"] - before["disk"]["writes"]
        remote = st["remote"]["puts"] - before["remote"]["puts"]
        if new > 0 and st["writeback_queue"] == 0 and disk >= new and remote >= new:
            return
        time.sleep(0.2)
    raise TimeoutError(f"write-through of {worker}'s chunks did not finish: {st}")


def run_cluster(mode: str, model_dir: str, args, log_root: str) -> dict[str, list[float]]:
    rng = random.Random(42 if mode == "push" else 43)

    def prompt() -> list[int]:
        return [rng.randrange(10, 3000) for _ in range(args.tokens)]

    env = {"VLLM_LOGGING_LEVEL": "WARNING"}
    if mode == "push":
        disk = tempfile.mkdtemp(prefix="pdmesh-bench-disk-")
        env.update(
            PDMESH_TIER_DISK_ENABLED="true",
            PDMESH_TIER_DISK_PATH=disk,
            PDMESH_TIER_DISK_WRITE_THROUGH="true",
            PDMESH_TIER_DISK_FSYNC="false",
            PDMESH_TIER_DISK_MAX_BYTES="4GiB",
            PDMESH_TIER_POOL_BYTES="1GiB",
        )
    spec = ClusterSpec(
        model=model_dir,
        served_model_name=MODEL,
        port=free_port(),
        pd_mode=mode,
        cache_server=mode == "push",
        env=env,
        vllm_args=[
            "--dtype",
            args.dtype,
            "--max-model-len",
            str(args.tokens + 64),
            "--no-enable-prefix-caching",
            "--kv-cache-memory-bytes",
            str(2 << 30),
        ],
        log_dir=os.path.join(log_root, mode),
        startup_timeout=900,
    )
    out: dict[str, list[float]] = {}
    with LocalCluster(spec) as cluster:
        ttft(cluster.url, [5] * 300)  # warm-up: first-request costs (NIXL handshake, allocator) off the clock
        reps = args.reps if mode == "push" else args.nixl_reps
        for rep in range(reps):
            p = prompt()
            before = tier_stats(cluster, "prefill-0") if mode == "push" else {}
            out.setdefault(f"{mode}_cold", []).append(ttft(cluster.url, p))
            if mode != "push":
                continue
            wait_written_through(cluster, "prefill-0", before)
            out.setdefault("warm_memory", []).append(ttft(cluster.url, p))
            clear_tiers(cluster, ["memory"])
            out.setdefault("warm_disk", []).append(ttft(cluster.url, p))
            clear_tiers(cluster, ["memory", "disk"])
            out.setdefault("warm_remote", []).append(ttft(cluster.url, p))
            print(f"rep {rep}: " + ", ".join(f"{k}={v[-1]:.3f}s" for k, v in out.items()), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--nixl-reps", type=int, default=1, help="cold runs in NIXL mode (slow on CPU, see docs)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quick", action="store_true", help="tiny model, 1024 tokens, 1 rep (smoke run)")
    ap.add_argument("--modes", default="push,nixl")
    args = ap.parse_args()
    shape = QWEN_SHAPE
    if args.quick:
        shape, args.tokens, args.reps, args.nixl_reps = TINY_SHAPE, 1024, 1, 1
    home = Path(os.environ.get("PDMESH_HOME", Path.home() / ".cache" / "pdmesh"))
    name = "bench-tiny" if args.quick else "bench-qwen2.5-0.5b-shape"
    t0 = time.perf_counter()
    model_dir = str(make_model(home / "models" / name, shape))
    print(f"model {model_dir} ready in {time.perf_counter() - t0:.0f}s", flush=True)
    log_root = tempfile.mkdtemp(prefix="pdmesh-bench-ttft-")
    samples: dict[str, list[float]] = {}
    for mode in args.modes.split(","):
        samples.update(run_cluster(mode, model_dir, args, log_root))
    med = {k: statistics.median(v) for k, v in samples.items()}
    cold = med.get("push_cold")
    ratios = {
        f"{k}_over_cold": med[k] / cold
        for k in ("warm_memory", "warm_disk", "warm_remote")
        if k in med and cold
    }
    if "nixl_cold" in med and cold:
        ratios["push_cold_over_nixl_cold"] = cold / med["nixl_cold"]
    result = {
        "benchmark": "ttft",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": {"shape": shape.__dict__, "dtype": args.dtype},
        "prompt_tokens": args.tokens,
        "reps": {"push": args.reps, "nixl": args.nixl_reps},
        "ttft_s_samples": samples,
        "ttft_s_median": med,
        "ratios": ratios,
        "goal": {
            "warm_ttft_le_tenth_of_cold": bool(ratios) and ratios.get("warm_memory_over_cold", 1) <= 0.1
        },
        "logs": log_root,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("ttft-quick.json" if args.quick else "ttft.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ttft_s_median": med, "ratios": ratios}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        keys = [k for k in ("push_cold", "nixl_cold", "warm_memory", "warm_disk", "warm_remote") if k in med]
        ax.bar(keys, [med[k] for k in keys], color=["#888", "#bbb", "#2a7", "#4a9", "#6bb"][: len(keys)])
        ax.set_ylabel("TTFT (s), median")
        ax.set_title(f"TTFT at {args.tokens} prompt tokens, 1P1D push mode ({args.dtype})")
        for i, k in enumerate(keys):
            ax.text(i, med[k], f"{med[k]:.2f}s", ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except Exception as e:  # the JSON is the result; the plot is a convenience
        print(f"plot skipped: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
