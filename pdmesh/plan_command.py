"""``pdmesh plan``: read the inputs (a profile file, or a running cluster's metrics), plan, print JSON.

Exit codes: 0 a plan (printed); 1 no configuration within ``--max-workers`` meets the SLOs; 2 bad arguments, an
unreadable profile, an unreachable router or a window with too little traffic (the message says which).
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx

from pdmesh.planner import WorkerProfile, Workload, plan


def _fail(msg: str) -> int:
    print(f"pdmesh plan: {msg}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    if args.profile is None and args.from_router is None:
        return _fail("give --profile FILE or --from-router URL (where the service times come from)")
    base = None
    if args.profile is not None:
        try:
            base = WorkerProfile.load(args.profile)
        except (OSError, ValueError, TypeError, KeyError) as e:
            return _fail(f"cannot read the profile {args.profile}: {e}")
    observed = None
    if args.from_router is not None:
        from pdmesh.plan_live import ClusterScraper, ClusterUnreachable, NotEnoughTraffic
        from pdmesh.security import cluster_token_from_env

        token = args.token if args.token is not None else cluster_token_from_env()
        if args.window <= 0:
            return _fail("--window must be positive")
        print(f"pdmesh plan: observing {args.from_router} for {args.window:.0f} s", file=sys.stderr)
        try:
            with ClusterScraper(args.from_router, token) as scraper:
                observed = scraper.observe(args.window, min(2.0, args.window / 2), base)
        except NotEnoughTraffic as e:
            return _fail(f"not enough traffic to measure: {e} (send load, or widen --window)")
        except (ClusterUnreachable, httpx.HTTPError, httpx.InvalidURL, ValueError) as e:
            return _fail(f"cannot read the cluster's metrics from {args.from_router}: {e}")
    profile = observed.fitted.profile if observed else base
    seen = observed.workload if observed else None
    rate = args.rate if args.rate is not None else (seen.rate if seen else None)
    prompt = args.prompt_tokens if args.prompt_tokens is not None else (seen.prompt_tokens if seen else None)
    output = args.output_tokens if args.output_tokens is not None else (seen.output_tokens if seen else None)
    hit = args.hit_rate if args.hit_rate is not None else (seen.hit_rate if seen else 0.0)
    if rate is None or prompt is None or output is None:
        return _fail("--rate, --prompt-tokens and --output-tokens are needed with --profile alone")
    if not 0.0 <= hit < 1.0 or min(rate, prompt, output) <= 0:
        return _fail("rate, prompt and output tokens must be positive and 0 <= hit-rate < 1")
    w = Workload(rate, prompt, output, hit)
    best = plan(profile, w, args.ttft_slo, args.itl_slo, args.max_workers, args.cores)
    report: dict = {"workload": w.__dict__, "profile": profile.__dict__}
    if observed:
        report["observed"] = {
            "window_s": round(observed.window_s, 1),
            "workers": observed.workers,
            "load": observed.workload.__dict__,
            "assumed": list(observed.fitted.assumed),
            "points": {"prefill": observed.fitted.prefill_points, "decode": observed.fitted.decode_points},
        }
    if best is None:
        print(json.dumps(report, indent=2))
        print(
            f"pdmesh plan: no configuration of up to {args.max_workers} workers meets the SLOs",
            file=sys.stderr,
        )
        return 1
    report["plan"] = best.as_dict()
    print(json.dumps(report, indent=2))
    return 0
