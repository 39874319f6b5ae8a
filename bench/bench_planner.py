"""The planner against real clusters: measure one worker's service times, predict, run, compare.

1. **Profile** (``pdmesh up`` 1 prefill + 1 decode, the tiny model, vLLM multiprocess as shipped): prefill speed
   from non-streamed one-token requests of fresh prompts of several lengths (a line through time vs prompt
   tokens: slope = 1 / prefill tokens/s, intercept = fixed cost per request); decode step time from streamed
   requests at several concurrencies (a line through inter-token latency vs running requests).
2. **Runs**: 1P1D, 1P2D and 2P1D, each at saturation (``--clients`` clients sending back to back for
   ``--seconds``; fresh prompts of ``--prompt-tokens``, ``--output-tokens`` each): measured requests/s.
3. **Prediction** for each configuration from the profile alone: the event model of the planner
   (:mod:`pdmesh.plan_sim`, closed loop with the same number of clients, workers sharing this machine's cores) and
   the planner's capacity formula. The goal: predicted within 25% of measured.

    python bench/bench_planner.py [--seconds 60] [--clients 32]

Writes bench/results/planner.json (the profile is reusable: ``pdmesh plan --profile bench/results/planner.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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
from pdmesh.plan_sim import simulate
from pdmesh.planner import WorkerProfile, Workload, predict
from pdmesh.procs import free_port

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "pdmesh-tiny-llama"
ENGINE_ARGS = ["--max-model-len", "4096"]
_counter = iter(range(10**9))


def fresh_prompt(tokens: int) -> list[int]:
    """Token ids nobody has sent before (no prefix cache or tier hit anywhere)."""
    rng = random.Random(next(_counter) * 7919 + os.getpid())
    return [rng.randrange(10, 3000) for _ in range(tokens)]


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line: (intercept, slope)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


async def stream_itl(client: httpx.AsyncClient, url: str, prompt: list[int], out: int) -> list[float]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": out, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    stamps = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)]


def measure_profile(url: str) -> dict:
    lengths, times = [], []
    with httpx.Client(timeout=300, trust_env=False) as c:
        for tokens in (128, 512, 1024, 2048, 128, 512, 1024, 2048):
            body = {"model": MODEL, "prompt": fresh_prompt(tokens), "max_tokens": 1, "temperature": 0}
            t0 = time.perf_counter()
            c.post(url + "/v1/completions", json=body).raise_for_status()
            lengths.append(tokens)
            times.append(time.perf_counter() - t0)
    intercept, slope = fit(lengths, times)

    async def itl_at(concurrency: int) -> float:
        async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
            gaps = await asyncio.gather(
                *(stream_itl(client, url, fresh_prompt(64), 48) for _ in range(concurrency))
            )
        return statistics.median([g for gs in gaps for g in gs[8:]])  # steps once all have joined

    concurrencies = [1, 4, 8, 16]
    itls = [asyncio.run(itl_at(n)) for n in concurrencies]
    s0, s1 = fit(concurrencies, itls)
    return {
        "prefill_tokens_per_s": 1.0 / slope,
        "prefill_overhead_s": max(intercept, 0.0),
        "decode_step_s": max(s0, 1e-4),
        "decode_step_per_seq_s": max(s1, 1e-5),
        "transfer_s": 0.0,  # inside the intercept above
        "raw": {"prompt_tokens": lengths, "seconds": times, "concurrency": concurrencies, "itl_s": itls},
    }


async def saturate(url: str, clients: int, seconds: float, prompt_tokens: int, output_tokens: int) -> dict:
    done, errors = 0, 0
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(timeout=600, trust_env=False, limits=limits) as client:

        async def user() -> None:
            nonlocal done, errors
            while time.monotonic() < stop:
                body = {"model": MODEL, "prompt": fresh_prompt(prompt_tokens), "max_tokens": output_tokens,
                        "temperature": 0, "ignore_eos": True}  # fmt: skip
                try:
                    r = await client.post(url + "/v1/completions", json=body)
                    if r.status_code == 200 and time.monotonic() < stop:
                        done += 1
                    elif r.status_code != 200:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1

        t0 = time.monotonic()
        await asyncio.gather(*(user() for _ in range(clients)))
    return {"completed": done, "errors": errors, "seconds": seconds, "rps": done / seconds,
            "wall_s": time.monotonic() - t0}  # fmt: skip


def run_cluster(prefill: int, decode: int, log_root: str, fn):
    spec = ClusterSpec(
        port=free_port(), prefillers=prefill, decoders=decode, vllm_args=ENGINE_ARGS, startup_timeout=900,
        log_dir=os.path.join(log_root, f"{prefill}p{decode}d"),
    )  # fmt: skip
    with LocalCluster(spec) as cluster:
        return fn(cluster.url)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--configs", default="1:1,1:2,2:1")
    ap.add_argument("--out", default=str(RESULTS / "planner.json"))
    args = ap.parse_args()
    cores = float(os.cpu_count() or 1)
    log_root = tempfile.mkdtemp(prefix="pdmesh-planner-")
    t0 = time.time()
    measured_profile = run_cluster(1, 1, log_root, measure_profile)
    profile = WorkerProfile(**{k: v for k, v in measured_profile.items() if k != "raw"})
    print("profile:", json.dumps(measured_profile), flush=True)
    w = Workload(1.0, args.prompt_tokens, args.output_tokens)
    rows = []
    for cfg in args.configs.split(","):
        p, d = (int(x) for x in cfg.split(":"))
        sim = simulate(profile, w, p, d, requests=3000, cores=cores, seed=1, closed_loop=args.clients)
        formula = predict(profile, w, p, d, cores).max_rate
        got = run_cluster(
            p, d, log_root,
            lambda url: asyncio.run(saturate(url, args.clients, args.seconds, args.prompt_tokens, args.output_tokens)),
        )  # fmt: skip
        row = {
            "prefill": p,
            "decode": d,
            "measured_rps": round(got["rps"], 3),
            "errors": got["errors"],
            "predicted_rps_event_model": round(sim.throughput, 3),
            "predicted_rps_capacity_formula": round(formula, 3),
            "ratio_predicted_to_measured": round(sim.throughput / got["rps"], 3) if got["rps"] else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "bench": "planner",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": vars(args),
        "profile": {k: v for k, v in measured_profile.items() if k != "raw"},
        "profile_measurements": measured_profile["raw"],
        "runs": rows,
        "within_25_percent": all(
            r["ratio_predicted_to_measured"] and abs(r["ratio_predicted_to_measured"] - 1) <= 0.25
            for r in rows
        ),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"within_25_percent": result["within_25_percent"], "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
