"""Push GB/s between two hosts: two network namespaces joined by a veth pair (root; tests/netns.py), per backend,
on the bare link and on rate-limited links, pushed the way workers push (a whole request's chunks in one push:
64 chunks of 1.5 MiB, an 8k-token prompt of the Qwen2.5-0.5B-shaped model).

    sudo python bench/bench_transfer_hosts.py [--pushes 10]

Per link, in the same run: ``socket`` (one bare TCP stream carrying the same 96 MiB per push in one ``sendall``,
no transfer layer: a reference, which our ``tcp`` backend, sending chunk by chunk, beats on the bare pair), our
``tcp`` backend, ``nixl`` as shipped (two lanes here: :func:`pdmesh.transfer.nixl_agent.lanes_wanted`) and
``nixl:1 lane`` (one agent, one UCX connection) and ``nixl:spinlock`` (UCX's worker lock left a spinlock:
``UCX_USE_MT_MUTEX=n``); the senders take turns push by push
so that background load on this 2-core machine falls on all alike. NIXL runs on UCX's TCP transport
(``UCX_TLS=tcp``): the namespaces share one machine, where UCX would otherwise take shared memory or cma. Rates are limited with ``tbf``; link delay needs ``sch_netem``, which this machine's
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
PEER = [sys.executable, "-m", "tests.transfer.netns_peer"]
VARIANTS = {
    "nixl:1 lane": {"PDMESH_NIXL_LANES": "1"},  # NIXL as before lanes: one agent, one UCX connection
    "nixl:spinlock": {"UCX_USE_MT_MUTEX": "n"},  # as before UCX's worker lock became a mutex (nixl_agent.py)
}
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


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM first: a receiver unlinks its pool's segment on it."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def link_row(
    hosts: HostPair, kinds: list[str], pushes: int, envs: dict[str, dict[str, str]] | None = None
) -> dict:
    """One receiver and one sender process per kind (``socket``: one bare TCP stream, the link's ceiling; a
    backend name: that backend alone; ``backend:label``: the same with ``envs[kind]`` added to its environment),
    each sender's cold push first, then ``pushes`` warm pushes per kind taken in turns (the order flips every
    round), so that this 2-core machine's background load falls on all alike."""
    peer_cmd = PEER
    common = ["--chunks", str(PER_PUSH), "--chunk-bytes", str(CHUNK)]
    procs: list[subprocess.Popen] = []
    pipes = {"text": True, "stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    try:
        senders, cold = {}, {}
        for kind in kinds:
            env = {**os.environ, "UCX_TLS": "tcp", "PYTHONUNBUFFERED": "1", **(envs or {}).get(kind, {})}
            backend = kind.split(":")[0]
            if kind == "socket":
                rx_args, tx_args = ["socket-receive"], ["socket-send"]
            else:
                slots = str(PER_PUSH * (pushes + 1))
                rx_args = ["receive", "--backend", backend, "--slots", slots]
                tx_args = ["send", "--backend", backend, "--step"]
            rx = hosts.run("b", [*peer_cmd, *rx_args, "--host", hosts.addr["b"], *common],
                           env={**env, "UCX_NET_DEVICES": hosts.dev["b"]}, **pipes)  # fmt: skip
            procs.append(rx)
            host, port = _json_line(rx, 60)["address"]
            tx = hosts.run("a", [*peer_cmd, *tx_args, "--host", hosts.addr["a"], "--peer", f"{host}:{port}", *common],
                           env={**env, "UCX_NET_DEVICES": hosts.dev["a"]}, **pipes)  # fmt: skip
            procs.append(tx)
            out = _json_line(tx, 120)
            if not out["ok"]:
                raise RuntimeError(f"{kind}: {out}")
            senders[kind], cold[kind] = tx, out["cold_s"]
        warm: dict[str, list[float]] = {k: [] for k in kinds}
        for i in range(pushes):
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                tx = senders[kind]
                tx.stdin.write("push\n")
                tx.stdin.flush()
                out = _json_line(tx, 120)
                if not out["ok"]:
                    raise RuntimeError(f"{kind}: {out}")
                warm[kind].append(out["gbps"])
        for tx in senders.values():
            tx.stdin.write("quit\n")
            tx.stdin.flush()
        return {
            kind: {
                "gbps_median": statistics.median(warm[kind]),
                "gbps_best": max(warm[kind]),
                "cold_push_s": cold[kind],
                "pushes": len(warm[kind]),
            }
            for kind in kinds
        }
    finally:
        for proc in reversed(procs):
            _stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pushes", type=int, default=10)
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
            kinds = ["socket", *backends] + (list(VARIANTS) if "nixl" in backends else [])
            row = {"link": label, **link_row(hosts, kinds, a.pushes, VARIANTS)}
            for b in kinds[1:]:
                row[f"{b}_vs_socket"] = round(row[b]["gbps_median"] / row["socket"]["gbps_median"], 3)
            if "nixl" in row:
                row["nixl_vs_tcp"] = round(row["nixl"]["gbps_median"] / row["tcp"]["gbps_median"], 3)
                row["lanes_gain"] = round(row["nixl"]["gbps_median"] / row["nixl:1 lane"]["gbps_median"], 3)
                row["mutex_gain"] = round(row["nixl"]["gbps_median"] / row["nixl:spinlock"]["gbps_median"], 3)
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
