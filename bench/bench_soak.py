"""Soak: a long run at concurrency 32 with processes killed on purpose; answers exact, memory flat, nothing leaked.

A real cluster as ``pdmesh up`` runs it (router, 1 prefill + 2 decode workers with vLLM in its default
multiprocess mode, the tiny model, the cache server, the cluster token set; :meth:`LocalCluster.supervise`
restarts what dies, as ``pdmesh up`` does every second). 32 clients send requests back to back for
``--minutes``: completions and chat over a fixed set of prompts that share prefixes, half streamed, half not, and
``--abort-share`` of them abandoned by the client after the first chunk or a short timeout. Every answer that
completes is compared token by token with what one plain vLLM engine gives for the same request (computed first).

Faults: every ``--kill-every`` s one worker (``decode-1``, the same one each time) is killed with SIGKILL,
alternately the whole worker (agent, engine, tier: ``pdmesh up`` restarts it) and only its vLLM engine (the worker
agent restarts it); every ``--cache-kill-every`` s the cache server is killed (restarted by supervision).

Sampled every 10 s: the RSS of every process of the cluster (router, cache server, each worker's agent, vLLM API
server, engine core and tier server). Growth is measured on the processes that live through the whole run (the
killed ones restart from scratch) as the median RSS over the last ``--window`` s against the median over the
``--window`` s after ``--warmup`` s.

At the end (load stopped): every tier holds no pins, in-use or in-flight chunks or leases, and no engine holds KV
blocks or running requests.

    python bench/bench_soak.py [--minutes 30] [--concurrency 32]

Writes bench/results/soak.json and soak.png (RSS and latency over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmesh.cluster import ClusterSpec, LocalCluster
from pdmesh.procs import free_port
from pdmesh.security import TOKEN_HEADER
from pdmesh.worker.vllm_process import VLLMServer, VLLMServerSpec, detect_device
from tests.e2e.oracle import WORDS

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "soak-cluster-secret"
MODEL = "pdmesh-tiny-llama"
ENGINE_ARGS = ["--max-model-len", "2048", "--seed", "0"]


def make_requests(n_prompts: int, seed: int) -> list[tuple[str, dict]]:
    """(path, body): prompts built from a few shared prefixes (system prompts, documents) + a question each."""
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(150, 700))) for _ in range(6)]
    out = []
    for i in range(n_prompts):
        text = rng.choice(prefixes) + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 60)))
        if i % 2:
            path = "/v1/chat/completions"
            body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        else:
            path, body = "/v1/completions", {"model": MODEL, "prompt": text}
        body.update(max_tokens=rng.choice([4, 8, 16, 32]), temperature=0, return_token_ids=True)
        out.append((path, body))
    return out


def _ids_from_response(data: dict) -> list[int]:
    return list(data["choices"][0]["token_ids"])


async def send(client: httpx.AsyncClient, url: str, path: str, body: dict, stream: bool) -> list[int]:
    """Token ids of a complete answer. Raises httpx errors, or RuntimeError('status N' / 'stream error')."""
    if not stream:
        r = await client.post(url + path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}")
        return _ids_from_response(r.json())
    ids: list[int] = []
    async with client.stream("POST", url + path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError("stream error event")
            for choice in event.get("choices", []):
                ids += choice.get("token_ids") or []
    return ids


def reference(model: str, requests: list[tuple[str, dict]], log_dir: str) -> list[list[int]]:
    spec = VLLMServerSpec(
        model=model, host="127.0.0.1", port=free_port(), served_model_name=MODEL, kv_transfer_config=None,
        extra_args=ENGINE_ARGS, device=detect_device(),
    )  # fmt: skip
    server = VLLMServer(spec, log_path=os.path.join(log_dir, "reference.log"))
    try:
        server.wait_healthy(600)

        async def run() -> list[list[int]]:
            async with httpx.AsyncClient(timeout=600, trust_env=False) as c:
                sem = asyncio.Semaphore(8)

                async def one(req):
                    async with sem:
                        return await send(c, server.url, req[0], req[1], stream=False)

                return await asyncio.gather(*(one(r) for r in requests))

        return asyncio.run(run())
    finally:
        server.stop()


class Sampler:
    """RSS of every process of the cluster every ``period`` s, labelled ``<child>/<role>``, keyed by pid."""

    def __init__(self, cluster: LocalCluster, t0: float, period: float = 10.0) -> None:
        self.cluster, self.t0, self.period = cluster, t0, period
        self.series: dict[str, dict] = {}  # "label@pid" -> {"label", "pid", "t": [], "rss_mib": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _label(self, owner: str, p: psutil.Process) -> str:
        cmd = " ".join(p.cmdline())
        if "tier-server" in cmd:
            return f"{owner}/tier"
        if "vllm.entrypoints" in cmd:
            return f"{owner}/vllm-api"
        if p.name().startswith("VLLM") or "EngineCore" in p.name() or "multiprocessing" in cmd:
            return f"{owner}/vllm-engine"
        return f"{owner}/{p.name()}"

    def sample(self) -> None:
        now = time.monotonic() - self.t0
        for owner, proc in self.cluster._children():
            try:
                root = psutil.Process(proc.pid)
                procs = [(owner if owner in ("router", "cache-server") else f"{owner}/agent", root)]
                procs += [(self._label(owner, c), c) for c in root.children(recursive=True)]
            except psutil.Error:
                continue
            for label, p in procs:
                try:
                    rss = p.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                s = self.series.setdefault(
                    f"{label}@{p.pid}", {"label": label, "pid": p.pid, "t": [], "rss_mib": []}
                )
                s["t"].append(round(now, 1))
                s["rss_mib"].append(round(rss, 1))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()


def kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def engine_of(agent_pid: int) -> psutil.Process | None:
    try:
        for p in psutil.Process(agent_pid).children(recursive=True):
            if "vllm.entrypoints" in " ".join(p.cmdline()):
                return p
    except psutil.Error:
        pass
    return None


def registered(cluster: LocalCluster) -> set[str]:
    try:
        r = httpx.get(
            cluster.url + "/internal/workers", headers={TOKEN_HEADER: TOKEN}, timeout=5, trust_env=False
        )
        return {w["worker_id"] for w in r.json() if w.get("healthy")}
    except (httpx.HTTPError, ValueError):
        return set()


def nothing_held(cluster: LocalCluster) -> dict:
    headers = {TOKEN_HEADER: TOKEN}
    out = {}
    workers = httpx.get(
        cluster.url + "/internal/workers", headers=headers, timeout=10, trust_env=False
    ).json()
    for w in workers:
        name = w["worker_id"]
        s = httpx.get(
            cluster.tier_info(name)["http"] + "/stats", headers=headers, timeout=10, trust_env=False
        ).json()
        metrics = httpx.get(w["url"] + "/metrics", timeout=10, trust_env=False).text
        usage = running = 0.0
        for line in metrics.splitlines():
            if line.startswith("vllm:kv_cache_usage_perc"):
                usage += float(line.rsplit(" ", 1)[1])
            if line.startswith("vllm:num_requests_running"):
                running += float(line.rsplit(" ", 1)[1])
        m = s["memory"]
        out[name] = {
            "pinned": m["pinned"],
            "in_use": m["in_use"],
            "in_flight": m["in_flight"],
            "leases": s["transfer"]["receive"]["leases"],
            "pushes_in_flight": s["transfer"]["pushes_in_flight"],
            "kv_cache_usage": usage,
            "requests_running": running,
        }
    return out


def growth(series: dict[str, dict], t_end: float, warmup: float, window: float) -> dict[str, dict]:
    """Per process alive from before ``warmup`` to the end: median RSS of the last window / of the first."""
    out = {}
    for key, s in series.items():
        t, rss = s["t"], s["rss_mib"]
        if not t or t[0] > warmup or t[-1] < t_end - 2 * 10:
            continue  # restarted during the run (or gone): not a whole-run process
        first = [r for ti, r in zip(t, rss, strict=True) if warmup <= ti < warmup + window]
        last = [r for ti, r in zip(t, rss, strict=True) if ti >= t_end - window]
        if first and last:
            a, b = statistics.median(first), statistics.median(last)
            out[key] = {
                "label": s["label"],
                "rss_mib_start": a,
                "rss_mib_end": b,
                "growth": round(b / a - 1, 4),
            }
    return out


async def load(
    url: str, requests: list, expected: list, stop_at: float, concurrency: int, abort_share: float, t0: float
) -> tuple[Counter, list[dict], list[tuple]]:
    outcomes: Counter = Counter()
    wrong: list[dict] = []
    samples: list[tuple] = []  # (t, latency_s, outcome)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:

        async def user(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                i = rng.randrange(len(requests))
                path, body = requests[i]
                stream = rng.random() < 0.5
                start = time.monotonic()
                kind = "stream" if stream else "plain"
                try:
                    if rng.random() < abort_share:
                        kind = "abort"
                        await asyncio.wait_for(send(client, url, path, body, stream), rng.uniform(0.05, 0.5))
                        outcome = "completed_before_abort"
                    else:
                        ids = await send(client, url, path, body, stream)
                        if ids == expected[i]:
                            outcome = "ok"
                        else:
                            outcome = "wrong"
                            wrong.append({"request": i, "stream": stream, "got": ids, "want": expected[i]})
                except asyncio.TimeoutError:
                    outcome = "aborted_by_client" if kind == "abort" else "timeout"
                except RuntimeError as e:
                    outcome = str(e)
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                outcomes[f"{kind}:{outcome}"] += 1
                samples.append((round(start - t0, 2), round(time.monotonic() - start, 3), outcome))

        await asyncio.gather(*(user(s) for s in range(concurrency)))
    return outcomes, wrong, samples


def plot(result: dict, series: dict, samples: list[tuple], kills: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 9), sharex=True)
    by_label: dict[str, list] = {}
    for s in series.values():
        by_label.setdefault(s["label"], []).append(s)
    for label, ss in sorted(by_label.items()):
        for j, s in enumerate(ss):
            ax1.plot([t / 60 for t in s["t"]], s["rss_mib"], label=label if j == 0 else None, lw=1)
    ax1.set_ylabel("RSS (MiB)")
    ax1.set_title("RSS of every process (a restarted process starts a new line)")
    ax1.legend(fontsize=6, ncol=3)
    minutes: dict[int, list[float]] = {}
    for t, lat, outcome in samples:
        if outcome == "ok":
            minutes.setdefault(int(t // 60), []).append(lat)
    xs = sorted(minutes)
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        ys = [sorted(minutes[m])[min(len(minutes[m]) - 1, int(q * len(minutes[m])))] for m in xs]
        ax2.plot([x + 0.5 for x in xs], ys, marker=".", label=f"latency {name} (exact answers)")
    for k in kills:
        for ax in (ax1, ax2):
            ax.axvline(k["t"] / 60, color="red" if "cache" in k["what"] else "grey", lw=0.6, ls="--")
    ax2.set_ylabel("end-to-end latency (s)")
    ax2.set_xlabel("minutes (dashed: kills; red = cache server)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--abort-share", type=float, default=0.1)
    ap.add_argument("--kill-every", type=float, default=300.0, help="seconds between kills of decode-1")
    ap.add_argument("--cache-kill-every", type=float, default=420.0)
    ap.add_argument("--warmup", type=float, default=300.0)
    ap.add_argument("--window", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = ap.parse_args()

    from pdmesh.modelgen import ensure_default_model

    model = str(ensure_default_model())
    log_dir = tempfile.mkdtemp(prefix="pdmesh-soak-")
    requests = make_requests(args.prompts, args.seed)
    t_ref = time.monotonic()
    expected = reference(model, requests, log_dir)
    print(
        f"reference answers: {len(expected)} in {time.monotonic() - t_ref:.0f}s; logs in {log_dir}",
        flush=True,
    )

    spec = ClusterSpec(
        model=model, served_model_name=MODEL, port=free_port(), prefillers=1, decoders=2, cache_server=True,
        vllm_args=ENGINE_ARGS, log_dir=log_dir, startup_timeout=600, env={"PDMESH_CLUSTER_TOKEN": TOKEN},
    )  # fmt: skip
    kills: list[dict] = []
    restarts: list[dict] = []
    with LocalCluster(spec) as cluster:
        t0 = time.monotonic()
        sampler = Sampler(cluster, t0).start()
        sampler.sample()
        stop_at = t0 + args.minutes * 60
        done = threading.Event()

        def faults() -> None:
            next_kill, next_cache, n = t0 + args.kill_every, t0 + args.cache_kill_every, 0
            while not done.wait(1.0):  # on the main thread (see below)
                now = time.monotonic()
                try:
                    for name in cluster.supervise():  # what `pdmesh up` does every second
                        restarts.append({"t": round(now - t0, 1), "what": name})
                except RuntimeError as e:
                    restarts.append({"t": round(now - t0, 1), "what": f"gave up: {e}"})
                if now >= stop_at - 60:
                    continue  # no kill in the last minute: the end state is measured on a settled cluster
                if now >= next_kill:
                    whole = n % 2 == 0
                    if not whole and "decode-1" not in registered(cluster):
                        continue  # still restarting from the last kill: kill its engine once it serves again
                    if whole:
                        kill_tree(cluster.workers["decode-1"].pid)
                    elif (engine := engine_of(cluster.workers["decode-1"].pid)) is not None:
                        kill_tree(engine.pid)
                    kills.append(
                        {"t": round(now - t0, 1), "what": "decode-1 worker" if whole else "decode-1 vLLM"}
                    )
                    next_kill, n = now + args.kill_every, n + 1
                if now >= next_cache:
                    kill_tree(cluster.cache_server.pid)
                    kills.append({"t": round(now - t0, 1), "what": "cache server"})
                    next_cache = now + args.cache_kill_every

        # The load runs in a thread; supervision (which spawns replacement processes) stays on the main thread:
        # a child's PR_SET_PDEATHSIG fires when the thread that spawned it exits.
        loaded: dict = {}

        def run_load() -> None:
            try:
                loaded["out"] = asyncio.run(
                    load(cluster.url, requests, expected, stop_at, args.concurrency, args.abort_share, t0)
                )
            finally:
                done.set()

        load_thread = threading.Thread(target=run_load, daemon=True)
        load_thread.start()
        faults()
        load_thread.join()
        outcomes, wrong, samples = loaded["out"]
        t_end = time.monotonic() - t0
        settle = time.monotonic() + 600  # let the last restart finish before judging the end state
        while True:
            restarts += [{"t": round(time.monotonic() - t0, 1), "what": n} for n in cluster.supervise()]
            try:
                cluster.wait_ready(1, 2, 5)
                break
            except (TimeoutError, RuntimeError):
                if time.monotonic() > settle:
                    raise
        deadline = time.monotonic() + 120
        while True:
            held = nothing_held(cluster)
            if all(not any(v.values()) for v in held.values()) or time.monotonic() > deadline:
                break
            time.sleep(2)
        sampler.sample()
        sampler.stop()
        router_metrics = httpx.get(cluster.url + "/metrics", timeout=10, trust_env=False).text

    ok = [lat for _, lat, o in samples if o == "ok"]
    grow = growth(sampler.series, t_end, args.warmup, args.window)
    leaked = {w: {k: v for k, v in h.items() if v} for w, h in held.items() if any(h.values())}
    errors = Counter(
        {
            k: v
            for k, v in outcomes.items()
            if not k.endswith((":ok", ":aborted_by_client", ":completed_before_abort"))
        }
    )
    result = {
        "bench": "soak",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": vars(args) | {"workers": "1 prefill + 2 decode, vLLM multiprocess", "token": "set"},
        "duration_s": round(t_end, 1),
        "requests": sum(outcomes.values()),
        "outcomes": dict(sorted(outcomes.items())),
        "errors_by_type": dict(sorted(errors.items())),
        "wrong_answers": len(wrong),
        "wrong_examples": wrong[:5],
        "latency_s_exact_answers": {
            "count": len(ok),
            "p50": round(statistics.median(ok), 3) if ok else None,
            "p99": round(sorted(ok)[int(0.99 * (len(ok) - 1))], 3) if ok else None,
        },
        "kills": kills,
        "restarts": restarts,
        "rss_growth_whole_run_processes": grow,
        "max_rss_growth": max((g["growth"] for g in grow.values()), default=None),
        "held_at_idle": held,
        "leaked": leaked,
        "router_fallbacks": sum(
            float(line.rsplit(" ", 1)[1])
            for line in router_metrics.splitlines()
            if line.startswith("pdmesh_router_pd_requests_total") and "fallback" in line
        ),
        "rss_series": {
            k: {"label": s["label"], "t": s["t"], "rss_mib": s["rss_mib"]} for k, s in sampler.series.items()
        },
    }
    result["pass"] = (
        not wrong
        and not leaked
        and result["max_rss_growth"] is not None
        and result["max_rss_growth"] <= 0.10
        and args.minutes >= 30
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, sampler.series, samples, kills, out.with_suffix(".png"))
    summary = {
        k: result[k]
        for k in ("pass", "requests", "errors_by_type", "wrong_answers", "max_rss_growth", "leaked")
    }
    print(json.dumps(summary, indent=1))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
