"""pdmesh's defaults vs one vLLM engine vs two engines behind a round-robin router, on real workloads, in one run.

Workloads (:mod:`workload_traffic`; sizes by flags): multi-round chat (users x rounds, a shared system prompt,
per-user history, each round = history + the server's answer + a new question), long-document QA (documents
asked several questions, interleaved) and no reuse (random prompts). Streamed chat completions through the
``openai`` SDK, Poisson arrivals.

Targets, one after the other on this machine, same model and engine flags:
- ``pdmesh``: ``pdmesh up`` as shipped (1 prefill + 1 decode worker, router defaults);
- ``pdmesh-overlap``: the same with ``pd_overlap_legs`` (decode leg sent with the prefill leg);
- ``pdmesh-no-queue-rule``: the same with ``conditional_pd.max_prefill_queue_tokens: 0`` (PD whatever the queue);
- ``pdmesh-always-pd``: the same with every ``conditional_pd`` rule at 0 (every prompt through PD);
- ``pdmesh-no-idle-rule``: the same with ``conditional_pd.idle_decoder_max_uncached_tokens: 0`` (the previous
  defaults);
- ``vllm``: one plain vLLM server (prefix caching on), both cores;
- ``vllm-x2-rr``: two plain vLLM servers (a core each) behind the pdmesh router as a data-parallel pool with
  round robin (what a user would otherwise deploy);
- ``vllm-x2-cache-aware`` (``--with-dp-cache-aware``): the same pool with the router's cache-aware default.

Offered load: each workload runs once per rate of ``--qps`` (chat, no reuse) or ``--doc-qps`` (document QA), with
fresh text every time (nothing cached from the previous rate), as ``<workload>@<rate>`` rows: a light rate where
every target meets its SLOs and the latencies show the route's cost, and a rate where the SLOs bind, where goodput
tells the deployments apart (at a light rate every target's goodput is its offered rate).

Figures per target, workload and rate: TTFT p50/p90/p99, ITL p50/p90, end-to-end p50, output tokens/s, goodput
(requests/s meeting both ``--slo-ttft`` and ``--slo-itl``, the ITL of a request being its mean) and SLO attainment
(the share of requests meeting both), vLLM prefix-cache (APC) hit rate and tokens loaded from the pdmesh tier, PD vs
decode-only counts and the router's TTFT stages.

    python bench/bench_workload.py [--model tiny|qwen] [--targets pdmesh,vllm,vllm-x2-rr] [--quick]

Writes bench/results/workload[-<model>].json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload_traffic import WORKLOADS, Texts

from pdmesh.cluster import ClusterSpec, LocalCluster
from pdmesh.procs import ManagedProcess, free_port
from pdmesh.worker.vllm_process import VLLMServer, VLLMServerSpec

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "bench-model"
TOKEN = "bench-workload-secret"


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def scrape_all(text: str, name: str) -> dict[str, float]:
    """Label text -> value for every sample of metric ``name``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            out[head[len(name) :]] = out.get(head[len(name) :], 0.0) + float(value)
    return out


def engine_counters(urls: list[str]) -> dict[str, float]:
    """Prefix-cache (APC) queries/hits and prompt tokens by source, summed over the engines."""
    total: dict[str, float] = {}
    with httpx.Client(timeout=10, trust_env=False) as c:
        for url in urls:
            text = c.get(url + "/metrics").text
            for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
                total[name] = total.get(name, 0.0) + sum(scrape_all(text, name).values())
            for labels, v in scrape_all(text, "vllm:prompt_tokens_by_source_total").items():
                src = labels.split('source="')[1].split('"')[0] if 'source="' in labels else "all"
                total[f"prompt_tokens:{src}"] = total.get(f"prompt_tokens:{src}", 0.0) + v
    return total


ENGINE_TIMES = ("request_queue_time_seconds", "request_prefill_time_seconds", "time_to_first_token_seconds")


def engine_times(urls: dict[str, str]) -> dict[str, float]:
    """Sums and counts of vLLM's own per-request time histograms, per worker role ({url: role}). On a prefill
    engine: its queue and its prompt compute (with tier loads); on a decode engine, the queue time includes the
    wait for pushed KV (the connector keeps the request waiting) and the prefill time the load of the chunks."""
    out: dict[str, float] = {}
    with httpx.Client(timeout=10, trust_env=False) as c:
        for url, role in urls.items():
            text = c.get(url + "/metrics").text
            for name in ENGINE_TIMES:
                for suffix in ("_sum", "_count"):
                    key = f"{role}:{name}{suffix}"
                    out[key] = out.get(key, 0.0) + sum(scrape_all(text, f"vllm:{name}{suffix}").values())
    return out


def router_counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    out: dict[str, float] = {}
    for name in ("pdmesh_router_pd_requests_total", "pdmesh_router_decode_only_total"):
        for labels, v in scrape_all(text, name).items():
            out[name.removeprefix("pdmesh_router_").removesuffix("_total") + labels] = v
    for suffix in ("_sum", "_count"):
        for labels, v in scrape_all(text, "pdmesh_router_ttft_stage_seconds" + suffix).items():
            stage = labels.split('stage="')[1].split('"')[0]
            out[f"stage{suffix}:{stage}"] = out.get(f"stage{suffix}:{stage}", 0.0) + v
    return out


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


# -- targets ---------------------------------------------------------------------------------------------------
class Target:
    def __init__(
        self, url: str, engines: list[str], router: bool, roles: dict[str, str] | None = None
    ) -> None:
        self.url, self.engines, self.router = url, engines, router
        self.roles = roles or {u: "engine" for u in engines}  # engine url -> role (prefill, decode, engine)


@contextmanager
def pdmesh_target(model: str, engine_args: list[str], log_dir: str, **env: str) -> Iterator[Target]:
    spec = ClusterSpec(
        model=model, served_model_name=MODEL, port=free_port(), vllm_args=engine_args, log_dir=log_dir,
        startup_timeout=900, env={"PDMESH_CLUSTER_TOKEN": TOKEN, **env},
    )  # fmt: skip
    with LocalCluster(spec) as cluster:
        workers = httpx.get(
            cluster.url + "/internal/workers", headers={"X-PDMesh-Token": TOKEN}, timeout=10, trust_env=False
        ).json()
        yield Target(cluster.url, [w["url"] for w in workers], True, {w["url"]: w["role"] for w in workers})


def _engine(model: str, engine_args: list[str], log_dir: str, core: int | None) -> VLLMServer:
    env = {"VLLM_LOGGING_LEVEL": "WARNING"}
    if core is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
    spec = VLLMServerSpec(model, "127.0.0.1", free_port(), MODEL, None, engine_args, env)
    return VLLMServer(spec, log_path=os.path.join(log_dir, f"vllm-{spec.port}.log"))


@contextmanager
def vllm_target(model: str, engine_args: list[str], log_dir: str) -> Iterator[Target]:
    server = _engine(model, engine_args, log_dir, None)
    try:
        server.wait_healthy(900)
        yield Target(server.url, [server.url], router=False)
    finally:
        server.stop()


@contextmanager
def dp_target(model: str, engine_args: list[str], log_dir: str, policy: str) -> Iterator[Target]:
    servers = [_engine(model, engine_args, log_dir, core) for core in (0, 1)]
    router = None
    try:
        for s in servers:
            s.wait_healthy(900)
        port = free_port()
        static = [{"url": s.url, "role": "both", "models": [MODEL]} for s in servers]
        cfg = Path(log_dir) / f"router-{policy}.json"
        cfg.write_text(
            json.dumps(
                {"router": {"port": port, "policies": {"prefill": policy, "decode": policy},
                            "discovery": {"static": static}, "log_level": "warning"}}
            )
        )  # fmt: skip
        router = ManagedProcess(
            "router", [sys.executable, "-m", "pdmesh.cli", "router", "--config", str(cfg)],
            log_path=os.path.join(log_dir, f"router-{policy}.log"),
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError("router of the data-parallel pool not healthy")
        yield Target(url, [s.url for s in servers], router=True)
    finally:
        if router is not None:
            router.stop(10)
        for s in servers:
            s.stop()


TARGETS = {
    "pdmesh": lambda m, e, d: pdmesh_target(m, e, d),
    "pdmesh-overlap": lambda m, e, d: pdmesh_target(m, e, d, PDMESH_ROUTER_PD_OVERLAP_LEGS="true"),
    "pdmesh-no-queue-rule": lambda m, e, d: pdmesh_target(
        m, e, d, PDMESH_ROUTER_CONDITIONAL_PD_MAX_PREFILL_QUEUE_TOKENS="0"
    ),
    "pdmesh-always-pd": lambda m, e, d: pdmesh_target(
        m,
        e,
        d,
        PDMESH_ROUTER_CONDITIONAL_PD_MIN_UNCACHED_TOKENS="0",
        PDMESH_ROUTER_CONDITIONAL_PD_MAX_PREFILL_QUEUE_TOKENS="0",
        PDMESH_ROUTER_CONDITIONAL_PD_IDLE_DECODER_MAX_UNCACHED_TOKENS="0",
    ),
    "pdmesh-no-idle-rule": lambda m, e, d: pdmesh_target(
        m, e, d, PDMESH_ROUTER_CONDITIONAL_PD_IDLE_DECODER_MAX_UNCACHED_TOKENS="0"
    ),
    "vllm": lambda m, e, d: vllm_target(m, e, d),
    "vllm-x2-rr": lambda m, e, d: dp_target(m, e, d, "round_robin"),
    "vllm-x2-cache-aware": lambda m, e, d: dp_target(m, e, d, "cache_aware"),
}


# -- one target, all workloads -----------------------------------------------------------------------------------
def summarize(results: list, seconds: float, a) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl_all = [x for r in ok for x in r.itls]
    mean_itl = {id(r): (statistics.mean(r.itls) if r.itls else 0.0) for r in ok}
    good = [r for r in ok if r.ttft <= a.slo_ttft and mean_itl[id(r)] <= a.slo_itl]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "seconds": round(seconds, 2),
        "ttft_p50": pct(ttft, 50),
        "ttft_p90": pct(ttft, 90),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl_all, 50),
        "itl_p90": pct(itl_all, 90),
        "e2e_p50": pct([r.e2e for r in ok], 50),
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / seconds,
        "goodput_rps": len(good) / seconds,
        "slo_met": len(good),
        "slo_attainment": len(good) / len(results) if results else None,
        "prompt_tokens_mean": statistics.mean([r.prompt_tokens for r in ok]) if ok else None,
    }


def runs(a) -> list[tuple[str, float]]:
    """(workload, offered rate) in the order every target runs them (the texts follow this order)."""
    return [(w, rate) for w in a.workloads for rate in (a.doc_qps if w == "doc_qa" else a.qps)]


def run_target(name: str, target: Target, texts: Texts, a) -> dict:
    async def drive(workload: str, rate: float) -> list:
        # a client per event loop: its connection pool belongs to the loop that made it
        async with openai.AsyncOpenAI(
            base_url=target.url + "/v1", api_key="none", timeout=600, max_retries=0
        ) as client:
            return await WORKLOADS[workload](
                client, MODEL, texts, argparse.Namespace(**{**vars(a), "rate": rate})
            )

    out = {}
    for workload, rate in runs(a):
        eng0 = engine_counters(target.engines)
        times0 = engine_times(target.roles)
        rt0 = router_counters(target.url) if target.router else {}
        t0 = time.perf_counter()
        results = asyncio.run(drive(workload, rate))
        seconds = time.perf_counter() - t0
        row = summarize(results, seconds, a)
        eng = diff(engine_counters(target.engines), eng0)
        queries = eng.get("vllm:prefix_cache_queries_total", 0.0)
        row["apc_hit_rate"] = eng.get("vllm:prefix_cache_hits_total", 0.0) / queries if queries else 0.0
        prompt_total = sum(v for k, v in eng.items() if k.startswith("prompt_tokens:"))
        row["engine_prompt_tokens"] = {
            k.split(":")[1]: v for k, v in eng.items() if k.startswith("prompt_tokens:")
        }
        row["tier_hit_rate"] = (
            eng.get("prompt_tokens:external_kv_transfer", 0.0) / prompt_total if prompt_total else 0.0
        )
        times = diff(engine_times(target.roles), times0)
        row["engine_times_mean_s"] = {
            k.removesuffix("_sum"): round(v / times[k.replace("_sum", "_count")], 4)
            for k, v in times.items()
            if k.endswith("_sum") and times.get(k.replace("_sum", "_count"))
        }
        if target.router:
            rt = diff(router_counters(target.url), rt0)
            row["router"] = {k: v for k, v in rt.items() if not k.startswith("stage")}
            row["ttft_stages_mean_s"] = {
                k.split(":")[1]: rt[k] / rt[k.replace("_sum", "_count")]
                for k in rt
                if k.startswith("stage_sum:") and rt.get(k.replace("_sum", "_count"))
            }
        key = f"{workload}@{rate:g}"
        out[key] = row
        print(f"  {name:>20} {key:>12}: " + ", ".join(
            f"{k} {row[k]:.3f}" for k in ("ttft_p50", "ttft_p90", "itl_p50", "goodput_rps") if row[k] is not None
        ) + f"; ok {row['ok']}/{row['requests']}", flush=True)  # fmt: skip
    return out


def ratios(res: dict) -> dict:
    """The issue's goals, measured in this run: pdmesh vs one vLLM, and goodput vs the two-replica baseline."""
    out = {}
    p, v, rr = res.get("pdmesh"), res.get("vllm"), res.get("vllm-x2-rr")
    for w in p or {}:
        r = {}
        if v and w in v:
            for k in ("ttft_p50", "ttft_p90", "itl_p50"):
                if p[w][k] and v[w][k]:
                    r[f"{k}_vs_vllm"] = round(p[w][k] / v[w][k], 3)
        if rr and w in rr and rr[w]["goodput_rps"]:
            r["goodput_vs_x2_rr"] = round(p[w]["goodput_rps"] / rr[w]["goodput_rps"], 3)
        r["slo_attainment"] = {
            t: round(res[t][w]["slo_attainment"], 3)
            for t in res
            if w in res[t] and res[t][w]["slo_attainment"] is not None  # 0.0 (no request in SLO) is reported
        }
        out[w] = r
    return out


def plot(res: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(res)
    workloads = list(next(iter(res.values())))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, [("ttft_p50", "TTFT p50 (s)"), ("itl_p50", "ITL p50 (s)"),
                                        ("goodput_rps", "goodput (req/s in SLO)")], strict=True):  # fmt: skip
        width = 0.8 / len(targets)
        for i, t in enumerate(targets):
            vals = [res[t][w][key] or 0 for w in workloads]
            ax.bar([x + i * width for x in range(len(workloads))], vals, width, label=t)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(workloads))], workloads)
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "qwen"], default="tiny")
    ap.add_argument("--targets", default="pdmesh,vllm,vllm-x2-rr")
    ap.add_argument("--with-dp-cache-aware", action="store_true")
    ap.add_argument("--workloads", default="chat,doc_qa,no_reuse")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--history-tokens", type=int, default=2000)
    ap.add_argument("--question-tokens", type=int, default=40)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument(
        "--qps", default="1,4", help="offered rates of chat and no reuse (req/s, comma-separated)"
    )
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--doc-tokens-min", type=int, default=4000)
    ap.add_argument("--doc-tokens-max", type=int, default=6000)
    ap.add_argument(
        "--doc-qps", default="0.5,1", help="offered rates of document QA (req/s, comma-separated)"
    )
    ap.add_argument("--random-requests", type=int, default=16)
    ap.add_argument("--random-tokens", type=int, default=1500)
    ap.add_argument("--slo-ttft", type=float, default=1.0, help="seconds")
    ap.add_argument("--slo-itl", type=float, default=0.05, help="seconds (a request's mean ITL)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of the benchmark itself")
    a = ap.parse_args()
    a.workloads = a.workloads.split(",")
    a.qps = [float(x) for x in a.qps.split(",")]
    a.doc_qps = [float(x) for x in a.doc_qps.split(",")]
    if a.quick:
        a.users, a.rounds, a.system_tokens, a.history_tokens = 2, 2, 300, 300
        a.docs, a.questions, a.doc_tokens_min, a.doc_tokens_max, a.random_requests = 1, 2, 600, 800, 3
    targets = a.targets.split(",") + (["vllm-x2-cache-aware"] if a.with_dp_cache_aware else [])

    from transformers import AutoTokenizer

    from pdmesh.modelgen import ensure_default_model, make_model

    if a.model == "tiny":
        model = str(ensure_default_model())
    else:
        from bench_ttft import QWEN_SHAPE

        home = Path(os.environ.get("PDMESH_HOME", Path.home() / ".cache" / "pdmesh"))
        model = str(
            make_model(home / "models" / "bench-qwen2.5-0.5b-shape", QWEN_SHAPE)
        )  # shared with bench_ttft
    engine_args = ["--max-model-len", "8192", "--seed", "0"]
    if a.model == "qwen":  # as bench_ttft runs it: bf16, a bounded KV cache per engine
        engine_args += ["--dtype", "bfloat16", "--kv-cache-memory-bytes", str(2 << 30)]
    texts_seed = a.seed
    log_root = tempfile.mkdtemp(prefix="pdmesh-workload-")
    print(f"model {model}; logs {log_root}", flush=True)
    res: dict[str, dict] = {}
    for name in targets:
        texts = Texts(AutoTokenizer.from_pretrained(model), texts_seed)  # the same text for every target
        log_dir = os.path.join(log_root, name)
        os.makedirs(log_dir)
        t0 = time.monotonic()
        with TARGETS[name](model, engine_args, log_dir) as target:
            print(f"{name}: up in {time.monotonic() - t0:.0f}s", flush=True)
            res[name] = run_target(name, target, texts, a)
    suffix = "" if a.model == "tiny" else f"-{a.model}"
    suffix += "-quick" if a.quick else ""
    report = {
        "benchmark": "workload",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": a.model,
        "args": {k: v for k, v in vars(a).items()},
        "results": res,
        "ratios": ratios(res),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"workload{suffix}.json").write_text(json.dumps(report, indent=2))
    plot(res, RESULTS / f"workload{suffix}.png", f"workloads, {a.model} model, {os.cpu_count()} CPU cores")
    print(json.dumps(report["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
