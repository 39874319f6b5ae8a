"""Fuzz every listener of a running cluster with bad input; nothing may crash, hang or answer 5xx.

A real cluster (``pdmesh up`` as a library: router + 1 prefill + 1 decode worker with real vLLM engines and the
tiny model, their tier servers, a cache server, the cluster token set) is started, then:

- **router** (HTTP, the only listener clients reach): ``--http`` generated bad requests — bodies (not JSON, wrong
  types for every field, deep nesting, NaN, huge values, bad unicode, client-supplied internal fields), headers
  (content types, encodings, lengths that lie, huge and many headers), sizes (0 bytes to past the body limit),
  methods and paths, raw protocol garbage on the socket. Sent by 8 concurrent clients. Counted by outcome; the
  run fails on any 5xx, on a non-JSON error body from the application, and on a router that stops answering.
- **binary listeners**: ``--frames`` malformed frames spread over the prefill node's tier control socket, its
  transfer receiver and the cache server — random bytes, lying length prefixes, undecodable msgpack, maps of the
  wrong shape before authentication, and (after a correct authentication, i.e. a buggy or compromised peer)
  every op with fuzzed arguments. Counted by outcome; fails on a crashed or restarted server, an ``internal``
  error reply (a handler that did not validate its input) or a server that stops serving a correct client.
- afterwards: a correct request is served, every pid is the one it was at the start, and the tiers hold
  nothing (pins, in-use, in-flight, leases) once leases expire.

    python bench/bench_fuzz.py [--http 2000] [--frames 1200] [--seed 1]

Writes bench/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the case generators beside this file

from fuzz_frames import cache_target, gen_frames, send_frames, tier_target, transfer_target
from fuzz_http import MODEL, HttpCase, gen_http, send_http

from pdmesh.cluster import ClusterSpec, LocalCluster
from pdmesh.procs import free_port
from pdmesh.security import TOKEN_HEADER

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "fuzz-cluster-secret"


def pids(cluster: LocalCluster) -> dict[str, int]:
    out = {"router": cluster.router.pid, "cache-server": cluster.cache_server.pid}
    for w in cluster.workers:
        out[f"{w}-tier"] = cluster.tier_info(w)["pid"]
    return out


def tier_held(cluster: LocalCluster) -> dict[str, tuple]:
    held = {}
    for w in cluster.workers:
        s = httpx.get(
            cluster.tier_info(w)["http"] + "/stats",
            headers={TOKEN_HEADER: TOKEN},
            timeout=10,
            trust_env=False,
        ).json()
        m = s["memory"]
        held[w] = (m["pinned"], m["in_use"], m["in_flight"], s["transfer"]["receive"]["leases"])
    return held


def watch_health(url: str, futures: list, down: list[str], what: str) -> None:
    """Until every case is done: every 5 s the router must answer /health; progress printed."""
    while True:
        done = sum(f.done() for f in futures)
        try:
            httpx.get(url + "/health", timeout=5, trust_env=False).raise_for_status()
        except httpx.HTTPError as e:
            down.append(f"{what}, {done} cases in: {e}")
        print(f"{what} {done}/{len(futures)}", flush=True)
        if done == len(futures):
            return
        time.sleep(5)


def valid_request_ok(url: str) -> bool:
    r = httpx.post(
        url + "/v1/completions",
        json={"model": MODEL, "prompt": "the fuzz is over", "max_tokens": 4, "temperature": 0},
        timeout=120,
        trust_env=False,
    )
    return r.status_code == 200 and len(r.json()["choices"][0]["text"]) > 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--http", type=int, default=2000)
    ap.add_argument("--frames", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "fuzz.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    log_dir = tempfile.mkdtemp(prefix="pdmesh-fuzz-")
    spec = ClusterSpec(
        port=free_port(), cache_server=True, log_dir=log_dir, startup_timeout=600,
        env={"PDMESH_CLUSTER_TOKEN": TOKEN, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        vllm_args=["--max-model-len", "2048"],
    )  # fmt: skip
    t_start = time.time()
    with LocalCluster(spec) as cluster:
        at_start = pids(cluster)
        print(f"cluster up: {cluster.url}; pids {at_start}", flush=True)

        # router
        cases = [gen_http(rng) for _ in range(args.http)]
        outcomes: dict[str, Counter] = {}
        examples_5xx: list[dict] = []
        lock = threading.Lock()
        router_down = []

        def run_case(case: HttpCase, client: httpx.Client) -> None:
            out = send_http(cluster.url, case, client)
            with lock:
                outcomes.setdefault(case.kind, Counter())[out] += 1
                if out[:1] == "5" or ":" in out:
                    examples_5xx.append({"kind": case.kind, "outcome": out, "path": case.path})

        t0 = time.monotonic()
        timeout = httpx.Timeout(30.0, connect=5.0)
        with httpx.Client(timeout=timeout, trust_env=False) as client, ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(run_case, c, client) for c in cases]
            watch_health(cluster.url, futures, router_down, "http")
        for f in futures:
            f.result()
        http_s = time.monotonic() - t0

        # binary listeners
        info = cluster.tier_info("prefill-0")
        th, tp = info["transfer"].rsplit(":", 1)
        ch, cp = cluster.cache_server_url.split("//")[1].rsplit(":", 1)
        targets = [
            tier_target(info["socket"], TOKEN),
            transfer_target(th, int(tp), TOKEN),
            cache_target(ch, int(cp), TOKEN),
        ]
        frame_outcomes: dict[str, Counter] = {t.name: Counter() for t in targets}
        findings: list[dict] = []
        t0 = time.monotonic()
        jobs = [
            (targets[i % 3], *gen_frames(rng, ("tier", "transfer", "cache")[i % 3]))
            for i in range(args.frames)
        ]

        def run_frames(job) -> None:
            target, kind, authenticate, frames = job
            out = send_frames(target, authenticate, frames)
            with lock:
                frame_outcomes[target.name][f"{kind.split(':')[0]}:{out}"] += 1
                if out in ("reply:internal", "connect-failed") or out.startswith("auth-failed"):
                    findings.append({"target": target.name, "kind": kind, "outcome": out})

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(run_frames, job) for job in jobs]
            watch_health(cluster.url, futures, router_down, "frames")
        for f in futures:
            f.result()
        frames_s = time.monotonic() - t0

        # after
        served = valid_request_ok(cluster.url)
        at_end = pids(cluster)
        deadline = time.monotonic() + 90
        while True:
            held = tier_held(cluster)
            if all(not any(v) for v in held.values()) or time.monotonic() > deadline:
                break
            time.sleep(1)
        alive = {name: proc.alive() for name, proc in cluster._children()}

    n5xx = sum(c for o in outcomes.values() for k, c in o.items() if k[:1] == "5")
    result = {
        "bench": "fuzz",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "http": {
            "requests": len(cases),
            "seconds": round(http_s, 1),
            "outcomes_by_category": {k: dict(v) for k, v in sorted(outcomes.items())},
            "router_5xx": n5xx,
            "findings": examples_5xx[:50],
            "router_unanswered_health_checks": router_down,
        },
        "frames": {
            "frames": len(jobs),
            "seconds": round(frames_s, 1),
            "outcomes_by_target": {k: dict(sorted(v.items())) for k, v in frame_outcomes.items()},
            "findings": findings[:50],
        },
        "after": {
            "valid_request_served": served,
            "pids_at_start": at_start,
            "pids_at_end": at_end,
            "restarted_or_crashed": sorted(k for k in at_start if at_start[k] != at_end.get(k)),
            "all_processes_alive": all(alive.values()),
            "tier_held_at_idle": held,
        },
    }
    result["pass"] = (
        n5xx == 0
        and not examples_5xx
        and not router_down
        and not findings
        and served
        and not result["after"]["restarted_or_crashed"]
        and result["after"]["all_processes_alive"]
        and all(not any(v) for v in held.values())
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("pass",)} | {"5xx": n5xx, "findings": len(findings)}, indent=1))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
