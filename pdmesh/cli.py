"""The ``pdmesh`` command: one entry point, one subcommand per service or tool."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _cmd_make_model(args: argparse.Namespace) -> int:
    from pdmesh.modelgen import default_model_dir, make_model

    out = make_model(args.dir or default_model_dir(), force=args.force)
    print(out)
    return 0


def _cmd_router(args: argparse.Namespace) -> int:
    from pdmesh.router.config import RouterConfigError, load_router_config
    from pdmesh.router.main import run_router

    try:
        cfg = load_router_config(
            args.config, host=args.host, port=args.port, pd_mode=args.pd_mode, processes=args.processes
        )
        run_router(cfg)
    except RouterConfigError as e:
        print(f"pdmesh router: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_worker(role_name: str):
    def run(args: argparse.Namespace) -> int:
        from pdmesh.worker.agent import run_worker
        from pdmesh.worker.roles import ROLES

        return run_worker(ROLES[role_name], args)

    return run


def _cmd_up(args: argparse.Namespace) -> int:
    from pdmesh.cluster import ClusterSpec, LocalCluster

    spec = ClusterSpec(
        model=args.model,
        prefillers=args.prefillers,
        decoders=args.decoders,
        port=args.port,
        pd_mode=args.pd_mode,
        cache_server=args.cache_server,
        router_processes=args.router_processes,
        log_dir=args.log_dir,
        vllm_args=[a for a in args.vllm_args if a != "--"],
    )
    cluster = LocalCluster(spec)
    stopping = False

    def _stop(signum, frame):  # turn SIGTERM into the same clean path as Ctrl-C
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        print(
            f"pdmesh: starting router + {args.prefillers} prefill + {args.decoders} decode (logs: {cluster.log_dir})"
        )
        cluster.start()
        print(f"pdmesh ready: {cluster.url}/v1  (OpenAI API; Ctrl-C stops everything)", flush=True)
        if args.demo:
            return _demo_request(cluster.url)
        while True:  # a child that exits is restarted; a crash loop stops everything, saying why
            time.sleep(1)
            for name in cluster.supervise():
                print(
                    f"pdmesh: {name} exited; restarted it (log: {cluster.log_dir / (name + '.log')})",
                    flush=True,
                )
    except KeyboardInterrupt:
        print("pdmesh: stopping", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"pdmesh: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()


def _demo_request(url: str) -> int:
    """Two streamed chat requests: a short question (served by the decode worker alone: conditional PD) and one
    over a ~2,800-token document, longer than the idle-decoder bound (the prefill worker computes it and pushes the
    KV to the decode worker)."""
    import httpx

    models = httpx.get(url + "/v1/models", timeout=10, trust_env=False).json()["data"]
    model = models[0]["id"]
    document = " ".join(
        ["prefill workers compute the prompt and push its KV cache to a decode worker."] * 200
    )
    questions = [
        "Explain prefill and decode disaggregation.",
        f"{document}\n\nSummarise the text above in one sentence.",
    ]
    ok = True
    for question in questions:
        body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
                "temperature": 0, "stream": True}  # fmt: skip
        print(f"POST {url}/v1/chat/completions  model={model}  prompt: {len(question)} chars  (streaming)")
        text = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120, trust_env=False) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                text.append(delta)
                print(delta, end="", flush=True)
        print()
        ok = ok and bool(text)
    print("(the tiny built-in model has random weights: the text is gibberish, but every token is exact)")
    metrics = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    pd = [ln for ln in metrics.splitlines() if ln.startswith("pdmesh_router_pd_requests_total")]
    print("router (short prompts, or prompts an idle decoder can take, go decode-only; long ones prefill + push +"
          " decode):", *pd)  # fmt: skip
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    from pdmesh.worker.agent import add_worker_args
    from pdmesh.worker.roles import DECODE, PREFILL

    p = argparse.ArgumentParser(
        prog="pdmesh", description="prefill/decode disaggregation mesh for LLM serving"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-model", help="build the tiny built-in Llama model (deterministic)")
    s.add_argument("dir", nargs="?", default=None, help="output dir (default: ~/.cache/pdmesh/models/...)")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=_cmd_make_model)

    s = sub.add_parser("router", help="run the OpenAI-compatible router")
    s.add_argument("--config", default=None, help="YAML config (see configs/router.example.yaml)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--pd-mode", default=None, choices=["push", "nixl"])
    s.add_argument(
        "--processes", type=int, default=None, help="router processes sharing the port (one core each)"
    )
    s.set_defaults(func=_cmd_router)

    for name, role, cmd in (("prefiller", PREFILL, "prefill"), ("decoder", DECODE, "decode")):
        s = sub.add_parser(name, help=f"run a {cmd} worker (vLLM + registration)")
        add_worker_args(s, role)
        s.set_defaults(func=_cmd_worker(cmd))

    s = sub.add_parser("up", help="run a local cluster: router + prefill + decode workers")
    s.add_argument("--model", default=None, help="model dir (default: the embedded tiny model)")
    s.add_argument("--prefillers", type=int, default=1)
    s.add_argument("--decoders", type=int, default=1)
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--pd-mode", default="push", choices=["push", "nixl"])
    s.add_argument("--log-dir", default=None)
    s.add_argument("--cache-server", action="store_true", help="run a shared remote KV tier for all workers")
    s.add_argument("--router-processes", type=int, default=1, help="router processes sharing the port")
    s.add_argument("--demo", action="store_true", help="send one request, print the answer, stop")
    s.add_argument("vllm_args", nargs=argparse.REMAINDER, help="extra vLLM args for every worker after --")
    s.set_defaults(func=_cmd_up)

    s = sub.add_parser("status", help="the cluster's workers, their health and tier stats, from the router")
    s.add_argument("--router", default=os.environ.get("PDMESH_ROUTER_URL", "http://127.0.0.1:8000"))
    s.add_argument("--token", default=None, help="cluster token (default: $PDMESH_CLUSTER_TOKEN)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--timeout", type=float, default=3.0, help="seconds per call")
    s.set_defaults(func=_cmd_status)

    s = sub.add_parser(
        "plan",
        help="prefill and decode worker counts for a load, with the TTFT/ITL to expect (pdmesh/planner.py)",
        description="Service times come from --profile (bench/bench_planner.py) or are measured on a running "
        "cluster (--from-router: the engines' own metrics over --window seconds of its traffic, which also gives "
        "the load when --rate/--prompt-tokens/--output-tokens are not set).",
    )
    s.add_argument("--profile", help="JSON with one worker's service times (bench/bench_planner.py)")
    s.add_argument("--from-router", metavar="URL", help="measure service times and load on this cluster")
    s.add_argument("--window", type=float, default=30.0, help="seconds of traffic to observe (--from-router)")
    s.add_argument("--token", default=None, help="cluster token (default: $PDMESH_CLUSTER_TOKEN)")
    s.add_argument("--rate", type=float, help="requests/s (default with --from-router: the observed rate)")
    s.add_argument("--prompt-tokens", type=float)
    s.add_argument("--output-tokens", type=float)
    s.add_argument("--hit-rate", type=float, default=None, help="share of the prompt already cached (0-1)")
    s.add_argument("--ttft-slo", type=float, required=True, help="TTFT p90 goal, seconds")
    s.add_argument("--itl-slo", type=float, required=True, help="inter-token latency goal, seconds")
    s.add_argument(
        "--cores",
        type=float,
        default=None,
        help="cores all workers share on one machine (engines pinned as `pdmesh up` does: pdmesh/placement.py)",
    )
    s.add_argument("--max-workers", type=int, default=64)
    s.set_defaults(func=_cmd_plan)

    _add_optional_subcommands(sub)
    return p


def _cmd_plan(args: argparse.Namespace) -> int:
    from pdmesh import plan_command

    return plan_command.main(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from pdmesh import status
    from pdmesh.security import cluster_token_from_env

    token = args.token if args.token is not None else cluster_token_from_env()
    return status.main(args.router, token, as_json=args.json, timeout_s=args.timeout)


def _add_optional_subcommands(sub) -> None:
    """Subcommands contributed by layers (tier server, cache server, benchmarks) when present."""
    try:
        from pdmesh.kvcache import cli as kv_cli
    except ImportError:
        return
    kv_cli.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
