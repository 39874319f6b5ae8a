"""The planner against real clusters: measure one worker's service times, predict, run, compare.

1. **Profile** (``pdmesh up`` 1 prefill + 1 decode, the tiny model, vLLM multiprocess as shipped), read from the
   engines' own metrics as ``pdmesh plan --from-router`` does (:mod:`pdmesh.plan_live`): prefill seconds per
   request on the prefill engine kept busy (8 fresh prompts of one length in flight, one token out, so the engine
   batches them as a loaded prefill worker does; their time capped at the interval's length), for several lengths
   (a line: slope = 1 / prefill tokens/s, intercept = fixed cost per request); the decode engine's inter-token
   latency at several concurrencies (a line through latency vs running requests).
2. **Runs**: 1P1D, 1P2D and 2P1D, each at saturation (``--clients`` clients sending back to back for
   ``--seconds``; fresh prompts of ``--prompt-tokens``, ``--output-tokens`` each): measured requests/s.
3. **Prediction** for each configuration from the profile alone, for the load the runs offer: the planner's
   event model with the same number of clients sending back to back
   (:func:`pdmesh.plan_sim.closed_loop_throughput`: engines placed on this machine's cores as ``pdmesh up`` pins
   them, the host's CPU per request taken from the same cores; the clients bound the decode batches, so a decode
   step's fixed cost counts); beside it the open-arrivals capacity (:func:`pdmesh.planner.capacity`, batches as
   large as the load makes them), which over-predicts a closed loop where decode steps are short of requests.
   The goal: predicted within 25% of measured. Every request takes the prefill leg (conditional PD's rules off:
   the planner sizes pure PD pools).

    python bench/bench_planner.py [--seconds 60] [--clients 32]

Writes bench/results/planner.json (the profile is reusable: ``pdmesh plan --profile bench/results/planner.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmesh.cluster import ClusterSpec, LocalCluster
from pdmesh.plan_live import ClusterScraper, Points, fit_profile
from pdmesh.plan_sim import closed_loop_throughput
from pdmesh.planner import WorkerProfile, Workload, capacity, core_sharing
from pdmesh.procs import free_port

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "pdmesh-tiny-llama"
ENGINE_ARGS = ["--max-model-len", "4096"]
# The planner sizes pure PD pools: every request takes the prefill leg (conditional PD's rules, which send some
# requests decode-only under load, would move prefill work onto the decoders the model does not count).
ALWAYS_PD_ENV = {
    "PDMESH_ROUTER_CONDITIONAL_PD_MIN_UNCACHED_TOKENS": "0",
    "PDMESH_ROUTER_CONDITIONAL_PD_MAX_PREFILL_QUEUE_TOKENS": "0",
    "PDMESH_ROUTER_CONDITIONAL_PD_IDLE_DECODER_MAX_UNCACHED_TOKENS": "0",
}
_counter = iter(range(10**9))


def fresh_prompt(tokens: int) -> list[int]:
    """Token ids nobody has sent before (no prefix cache or tier hit anywhere)."""
    rng = random.Random(next(_counter) * 7919 + os.getpid())
    return [rng.randrange(10, 3000) for _ in range(tokens)]


async def _stream(client: httpx.AsyncClient, url: str, prompt: list[int], out: int) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": out, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for _ in r.aiter_lines():
            pass


def _part(cmd: str, is_self: bool) -> str:
    if is_self:
        return "client"
    for needle, part in (("VLLM::Worker", "engine_compute"), ("VLLM::EngineCore", "engine_core"),
                         ("vllm.entrypoints", "vllm_api_server"), ("tier-server", "tier"),
                         (" router ", "router"), (" prefiller ", "agent"), (" decoder ", "agent")):  # fmt: skip
        if needle in cmd:
            return part
    return "other"


def cpu_by_part() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and every process it started, by part of the cluster:
    the engines' model compute (the pinned ``VLLM::Worker`` processes) and everything else on the host."""
    me = psutil.Process()
    out: dict[str, float] = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            cmd = " ".join(p.cmdline()) or p.name()
        except psutil.Error:
            continue
        part = _part(f" {cmd} ", p.pid == me.pid)
        out[part] = out.get(part, 0.0) + t.user + t.system
    return out


def cpu_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    return {k: round((after.get(k, 0.0) - v) / max(requests, 1), 5) for k, v in before.items()}


PREFILL_IN_FLIGHT = 8


async def prefill_burst(url: str, tokens: int, prompts: int, in_flight: int = PREFILL_IN_FLIGHT) -> None:
    """``prompts`` fresh prompts of ``tokens``, one token out each, ``in_flight`` at a time."""
    gate = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:

        async def one() -> None:
            async with gate:
                body = {"model": MODEL, "prompt": fresh_prompt(tokens), "max_tokens": 1, "temperature": 0}
                (await client.post(url + "/v1/completions", json=body)).raise_for_status()

        await asyncio.gather(*(one() for _ in range(prompts)))


def measure_profile(url: str) -> dict:
    """Service times from the engines' own metrics (the same readings as ``pdmesh plan --from-router``): one
    prefill point per prompt length (fresh prompts, one token out, ``PREFILL_IN_FLIGHT`` at a time: the engine
    batches them as a loaded prefill worker does; the point is the interval's busy time per prompt), one KV-load
    point per length on the decode engine (prompts one at a time) and one decode
    point per concurrency (that many streams decoding together), fitted by :func:`pdmesh.plan_live.fit_profile`."""
    points = Points()
    raw: dict[str, list] = {"prefill": [], "decode": [], "load": []}
    with ClusterScraper(url, token="") as scraper:
        workers = scraper.workers()

        def interval(fn) -> None:
            _, before = scraper.snapshot(workers)
            t0 = time.monotonic()
            fn()
            seconds = time.monotonic() - t0
            _, after = scraper.snapshot(workers)
            for u, role in workers.items():
                points.add_interval(role, before[u], after[u], seconds)

        for tokens in (128, 512, 1024, 2048):
            # the decode engine's KV load per request: prompts one at a time (loads joining one step together
            # would each count the whole step)
            n, m = len(points.prefill), len(points.load)
            interval(lambda tokens=tokens: asyncio.run(prefill_burst(url, tokens, 4, in_flight=1)))
            del points.prefill[n:]
            raw["load"] += points.load[m:]
            # the prefill engine kept busy
            n, m = len(points.prefill), len(points.load)
            prompts = max(2 * PREFILL_IN_FLIGHT, 16384 // tokens)
            interval(lambda tokens=tokens, prompts=prompts: asyncio.run(prefill_burst(url, tokens, prompts)))
            del points.load[m:]
            raw["prefill"] += points.prefill[n:]

        async def decode_at(concurrency: int) -> None:
            async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
                # long answers, cancelled once measured: every stream decodes through the whole interval
                streams = [
                    asyncio.create_task(_stream(client, url, fresh_prompt(64), 2000))
                    for _ in range(concurrency)
                ]
                await asyncio.sleep(1.0)  # all prompts prefilled and decoding together
                n = len(points.decode)
                await asyncio.to_thread(interval, lambda: time.sleep(1.5))
                raw["decode"] += points.decode[n:]
                for task in streams:
                    task.cancel()
                await asyncio.gather(*streams, return_exceptions=True)
            await asyncio.sleep(1.0)  # the aborted requests leave the engine

        for concurrency in (1, 4, 8, 16):
            asyncio.run(decode_at(concurrency))
    # host CPU per request (router, API servers, engine cores, tiers, agents, this client): what the engines lose
    # of their cores to everything else when all share one machine; measured under load, 16 clients for 10 s
    before = cpu_by_part()
    burst = asyncio.run(saturate(url, 16, 10.0, 512, 32))
    per_part = cpu_per_request(before, cpu_by_part(), burst["finished"])
    raw["host_cpu_s_per_request"] = per_part
    fitted = fit_profile(points)
    host = sum(v for k, v in per_part.items() if k != "engine_compute")
    return {
        **fitted.profile.__dict__,
        "host_cpu_per_request_s": host,
        "assumed": list(fitted.assumed),
        "raw": raw,
    }


async def saturate(url: str, clients: int, seconds: float, prompt_tokens: int, output_tokens: int) -> dict:
    done, finished, errors = 0, 0, 0  # finished: also those completing after the window
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(timeout=600, trust_env=False, limits=limits) as client:

        async def user() -> None:
            nonlocal done, finished, errors
            while time.monotonic() < stop:
                body = {"model": MODEL, "prompt": fresh_prompt(prompt_tokens), "max_tokens": output_tokens,
                        "temperature": 0, "ignore_eos": True}  # fmt: skip
                try:
                    r = await client.post(url + "/v1/completions", json=body)
                    finished += r.status_code == 200
                    if r.status_code == 200 and time.monotonic() < stop:
                        done += 1
                    elif r.status_code != 200:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1

        t0 = time.monotonic()
        await asyncio.gather(*(user() for _ in range(clients)))
    return {"completed": done, "finished": finished, "errors": errors, "seconds": seconds, "rps": done / seconds,
            "wall_s": time.monotonic() - t0}  # fmt: skip


def run_cluster(prefill: int, decode: int, log_root: str, fn):
    spec = ClusterSpec(
        port=free_port(), prefillers=prefill, decoders=decode, vllm_args=ENGINE_ARGS, startup_timeout=900,
        log_dir=os.path.join(log_root, f"{prefill}p{decode}d"), env=dict(ALWAYS_PD_ENV),
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
    profile = WorkerProfile(**{k: v for k, v in measured_profile.items() if k not in ("raw", "assumed")})
    print("profile:", json.dumps(measured_profile), flush=True)
    w = Workload(1.0, args.prompt_tokens, args.output_tokens)
    rows = []
    for cfg in args.configs.split(","):
        p, d = (int(x) for x in cfg.split(":"))
        formula = capacity(profile, w, p, d, cores)  # open arrivals: batches as large as the load makes them
        # the load this benchmark offers: --clients clients back to back (they bound the decode batches)
        predicted = closed_loop_throughput(profile, w, p, d, args.clients, cores)

        def load(url: str) -> dict:
            before = cpu_by_part()
            out = asyncio.run(
                saturate(url, args.clients, args.seconds, args.prompt_tokens, args.output_tokens)
            )
            return {**out, "cpu": cpu_per_request(before, cpu_by_part(), out["finished"])}

        got = run_cluster(p, d, log_root, load)
        row = {
            "prefill": p,
            "decode": d,
            "engines_per_core": dict(zip(("prefill", "decode"), core_sharing(p, d, cores), strict=True)),
            "measured_rps": round(got["rps"], 3),
            "errors": got["errors"],
            "predicted_rps": round(predicted, 3),
            "predicted_rps_open_arrivals": round(formula, 3),
            "ratio_predicted_to_measured": round(predicted / got["rps"], 3) if got["rps"] else None,
            "cpu_s_per_request": got["cpu"],  # where the machine's time went, by part
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "bench": "planner",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": vars(args),
        "profile": {k: v for k, v in measured_profile.items() if k not in ("raw", "assumed")},
        "profile_assumed": measured_profile["assumed"],
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
