"""Push GB/s between two hosts: two network namespaces joined by a veth pair (root; tests/netns.py), per backend,
on the bare link and on rate-limited links, pushed the way workers push (a whole request's chunks in one push:
64 chunks of 1.5 MiB, an 8k-token prompt of the Qwen2.5-0.5B-shaped model).

    sudo python bench/bench_transfer_hosts.py [--pushes 6]

NIXL runs on UCX's TCP transport (``UCX_TLS=tcp``): the namespaces share one machine, where UCX would otherwise
take shared memory or cma. Rates are limited with ``tbf``; link delay needs ``sch_netem``, which this machine's
kernel lacks, so delay rows are left out when it is missing (and say so). Writes bench/results/transfer_hosts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmesh.transfer.nixl_backend import nixl_available
from tests.netns import HostPair, NetemMissing, netns_unavailable

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK = 1536 << 10
PER_PUSH = 64
LINKS = [("bare veth", None, None), ("25 Gbit/s", "25gbit", None), ("10 Gbit/s", "10gbit", None),
         ("25 Gbit/s + 20 us", "25gbit", "20us"), ("10 Gbit/s + 100 us", "10gbit", "100us")]  # fmt: skip


def _json_line(proc: subprocess.Popen, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no result: {proc.stderr.read()[-2000:] if proc.stderr else ''}")


def one(hosts: HostPair, backend: str, pushes: int) -> dict:
    """One sender process: a cold push (connection, NIXL agent, registration), then ``pushes`` warm ones."""
    env = {**os.environ, "UCX_TLS": "tcp", "PYTHONUNBUFFERED": "1"}
    peer_cmd = [sys.executable, "-m", "tests.transfer.netns_peer"]
    slots = str(PER_PUSH * (pushes + 1))
    rx = hosts.run(
        "b", [*peer_cmd, "receive", "--host", hosts.addr["b"], "--backend", backend, "--slots", slots],
        env={**env, "UCX_NET_DEVICES": hosts.dev["b"]}, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        host, port = _json_line(rx, 60)["address"]
        tx = hosts.run(
            "a", [*peer_cmd, "send", "--host", hosts.addr["a"], "--peer", f"{host}:{port}", "--backend", backend,
                  "--chunks", str(PER_PUSH), "--per-push", str(PER_PUSH), "--repeat", str(pushes)],
            env={**env, "UCX_NET_DEVICES": hosts.dev["a"]}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out = _json_line(tx, 300)
        tx.wait(30)
        if not out["ok"]:
            raise RuntimeError(f"{backend}: {out}")
        warm = out["warm_gbps"]
        return {"gbps_median": statistics.median(warm), "gbps_best": max(warm), "cold_push_s": out["cold_s"],
                "pushes": len(warm)}  # fmt: skip
    finally:
        rx.terminate()  # the receiver unlinks its pool's segment on SIGTERM
        try:
            rx.wait(10)
        except subprocess.TimeoutExpired:
            rx.kill()
            rx.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pushes", type=int, default=6)
    a = ap.parse_args()
    why = netns_unavailable()
    if why:
        print(f"cannot run: {why}")
        return 2
    backends = ["tcp"] + (["nixl"] if nixl_available() else [])
    rows, skipped = [], []
    for label, rate, delay in LINKS:
        with HostPair() as hosts:
            try:
                if rate:
                    hosts.shape(rate, delay)
            except NetemMissing as e:
                skipped.append(f"{label}: {e}")
                continue
            row = {"link": label}
            for backend in backends:
                row[backend] = one(hosts, backend, a.pushes)
            if "nixl" in row:
                row["nixl_vs_tcp"] = round(row["nixl"]["gbps_median"] / row["tcp"]["gbps_median"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "benchmark": "transfer_hosts",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "push": {"chunks": PER_PUSH, "chunk_bytes": CHUNK, "bytes": PER_PUSH * CHUNK},
        "rows": rows,
        "skipped": skipped,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transfer_hosts.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
