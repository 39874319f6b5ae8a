"""Benchmark: transfer GB/s per backend beside memcpy and a shared-memory single copy, in one run (docs/transfer.md).

    python bench/bench_transfer.py           # full run: 1, 16, 256 MiB; writes bench/results/transfer.json + .png
    python bench/bench_transfer.py --quick   # smoke run (< 20 s): 1 and 16 MiB, fewer rounds
    python bench/bench_transfer.py --pool-dir /mnt/huge   # receiver pool on another tmpfs (e.g. huge=within_size)

The receiver (a sink pool + Receiver with tcp, shm and nixl backends) runs in a spawned child process; this
process is the sender. A backend's number is a whole ``Sender.push`` of ONE chunk of the given size: ALLOC +
WRITE + COMMIT round trips included, GB/s = chunk bytes / wall seconds. Baselines in the same run: ``memcpy``
(numpy copy, one thread, between two private buffers of this process) and ``shm_copy`` (one ctypes.memmove into
the receiver's mapped pool segment: the floor of any same-host path). Rounds interleave all paths so machine
noise hits them alike; the median round is reported (best round too). Loopback only (UCX_NET_DEVICES=lo).

``request`` rows (full run): pushes as workers make them, a whole request's 64 chunks of 1.5 MiB (96 MiB, an
8k-token prompt of the Qwen2.5-0.5B-shaped model) in ONE push (one ALLOC of 64 keys, one descriptor list, one
COMMIT), beside a memcpy of the same 96 MiB. ``--pool-dir`` puts the receiver's pool segment on another tmpfs
(both processes map it there): the page size of the pool is what limits NIXL's cma path (docs/transfer.md).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import platform
import secrets
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("UCX_NET_DEVICES", "lo")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import pdmesh.transfer.segment as segment_mod
from pdmesh.transfer.backend import buffer_address
from pdmesh.transfer.errors import PoolExhausted
from pdmesh.transfer.receiver import Receiver, ReceiverConfig
from pdmesh.transfer.segment import SharedSegment, attach_segment
from pdmesh.transfer.sender import Chunk, Sender, SenderConfig

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20
FP = "bench-fingerprint"
REQ_CHUNKS = 64
REQ_CHUNK_BYTES = 3 * MiB // 2


class _SinkPool:
    """A RegionProvider that only measures moving bytes: regions are handed out back to back from offset 0 of one
    segment, and the cursor returns to 0 once every region was committed (the data is dropped). Pushes run one
    at a time, so every push of the benchmark writes the same, already mapped, memory."""

    def __init__(self, nbytes: int) -> None:
        self._segment = SharedSegment(f"pdmesh-ref-{os.getpid()}-{secrets.token_hex(4)}", nbytes)
        self.buffer = self._segment.buffer
        self.segment_name: str | None = self._segment.name
        self._cursor = 0
        self._open: set[bytes] = set()

    def alloc(self, key: bytes, nbytes: int, lease_deadline: float) -> int | None:
        if self._cursor + nbytes > self.buffer.nbytes:
            raise PoolExhausted("benchmark pool full")
        off, self._cursor = self._cursor, self._cursor + nbytes
        self._open.add(key)
        return off

    def commit(self, key: bytes) -> None:
        self._open.discard(key)
        if not self._open:
            self._cursor = 0

    abort = commit

    def reclaim_expired(self, now: float) -> int:
        return 0

    def close(self) -> None:
        self._segment.close()


def _make(name: str):
    if name == "tcp":
        from pdmesh.transfer.tcp_backend import TcpBackend

        return TcpBackend(FP)
    if name == "shm":
        from pdmesh.transfer.shm_backend import ShmBackend

        return ShmBackend(FP)
    from pdmesh.transfer.nixl_backend import NixlBackend

    return NixlBackend(FP)


def _receiver(conn, pool_bytes: int, backends: list[str], pool_dir: str | None) -> None:
    if pool_dir:
        segment_mod.SHM_DIR = pool_dir
    pool = _SinkPool(pool_bytes)
    rx = Receiver(pool, ReceiverConfig(fingerprint=FP), [_make(b) for b in backends])
    conn.send((rx.start(), pool.segment_name))
    conn.poll(3600)
    rx.close()
    pool.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument(
        "--pool-dir", default=None, help="tmpfs directory for the receiver pool (default /dev/shm)"
    )
    args = ap.parse_args()
    if args.pool_dir:
        segment_mod.SHM_DIR = args.pool_dir
    sizes = [1, 16] if args.quick else [1, 16, 256]
    rounds = args.rounds or (3 if args.quick else 7)
    try:
        import nixl._api  # noqa: F401

        backends = ["nixl", "tcp", "shm"]
    except Exception:
        backends = ["tcp", "shm"]
    max_bytes = max(sizes) * MiB
    request_rows = not args.quick
    pool_bytes = max(max_bytes, REQ_CHUNKS * REQ_CHUNK_BYTES if request_rows else 0)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child, pool_bytes, backends, args.pool_dir), daemon=True)
    proc.start()
    try:
        if not parent.poll(120):
            raise SystemExit("receiver did not start")
        address, segment = parent.recv()
        src = np.full(max_bytes, 7, dtype=np.uint8)
        src[::4096] = np.arange(len(src[::4096]), dtype=np.uint64).astype(np.uint8)
        dst = np.empty_like(src)
        src_mv = memoryview(src).cast("B")
        senders = {
            b: Sender(src_mv, SenderConfig(fingerprint=FP, backends=(b,)), {b: (lambda b=b: _make(b))})
            for b in backends
        }
        seg = attach_segment(segment)
        seg_view = memoryview(seg)
        seg_addr = buffer_address(seg_view)
        src_addr = src.ctypes.data
        counter = [0]

        def run_request(path: str) -> float:
            """A whole request's chunks in one push (or a memcpy of the same bytes)."""
            nbytes = REQ_CHUNKS * REQ_CHUNK_BYTES
            t0 = time.perf_counter()
            if path == "memcpy":
                np.copyto(dst[:nbytes], src[:nbytes])
            elif path == "shm_copy":
                for i in range(REQ_CHUNKS):
                    off = i * REQ_CHUNK_BYTES
                    ctypes.memmove(seg_addr + off, src_addr + off, REQ_CHUNK_BYTES)
            else:
                counter[0] += 1
                n = counter[0]
                chunks = [
                    Chunk(b"r%d-%d" % (n, i), i * REQ_CHUNK_BYTES, REQ_CHUNK_BYTES) for i in range(REQ_CHUNKS)
                ]
                r = senders[path].push(address, f"r{n}", chunks, time.monotonic() + 60)
                assert r.nbytes == nbytes and len(r.written) == REQ_CHUNKS, r
            return nbytes / (time.perf_counter() - t0) / 1e9

        def run(path: str, nbytes: int) -> float:
            t0 = time.perf_counter()
            if path == "memcpy":
                np.copyto(dst[:nbytes], src[:nbytes])
            elif path == "shm_copy":
                ctypes.memmove(seg_addr, src_addr, nbytes)
            else:
                counter[0] += 1
                r = senders[path].push(
                    address, f"b{counter[0]}", [Chunk(b"k%d" % counter[0], 0, nbytes)], time.monotonic() + 60
                )
                assert r.nbytes == nbytes, r
            return nbytes / (time.perf_counter() - t0) / 1e9

        paths = ["memcpy", "shm_copy", *backends]
        for p in paths:  # warm-up: connections, page faults on both sides
            run(p, max_bytes)
            if request_rows:
                run_request(p)
        samples: dict[str, dict[int, list[float]]] = {p: {s: [] for s in sizes} for p in paths}
        req_samples: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(rounds):
            for s in sizes:
                reps = max(1, min(16, (64 * MiB) // (s * MiB)))
                for p in paths:
                    best_of_reps = statistics.median(run(p, s * MiB) for _ in range(reps))
                    samples[p][s].append(best_of_reps)
            if request_rows:
                for p in paths:
                    req_samples[p].append(statistics.median(run_request(p) for _ in range(3)))
        for sd in senders.values():
            sd.close()
        seg_view.release()
        seg.close()
    finally:
        parent.close()
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join(5)

    results = {
        p: {
            f"{s}MiB": {"median_gbps": round(statistics.median(v), 3), "best_gbps": round(max(v), 3)}
            for s, v in by_size.items()
        }
        for p, by_size in samples.items()
    }
    big = f"{max(sizes)}MiB"
    med = {p: results[p][big]["median_gbps"] for p in paths}
    ratios = {f"{p}_vs_memcpy_{big}": round(med[p] / med["memcpy"], 3) for p in paths if p != "memcpy"}
    request = {}
    if request_rows:
        request = {
            p: {"median_gbps": round(statistics.median(v), 3), "best_gbps": round(max(v), 3)}
            for p, v in req_samples.items()
        }
        for p in paths:
            if p != "memcpy":
                ratios[f"{p}_vs_memcpy_request"] = round(
                    request[p]["median_gbps"] / request["memcpy"]["median_gbps"], 3
                )
    goals = {}
    if max(sizes) == 256:
        if "nixl" in med:
            goals["nixl_ge_50pct_memcpy_256MiB"] = med["nixl"] >= 0.5 * med["memcpy"]
        goals["tcp_ge_2GBps_256MiB"] = med["tcp"] >= 2.0
    out = {
        "benchmark": "transfer",
        "quick": args.quick,
        "rounds": rounds,
        "method": "one chunk per push (ALLOC+WRITE+COMMIT), sender in this process, receiver in a spawned "
        "process, loopback; median of rounds (each round = median of up to 16 reps)",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "env": {"UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES"), "UCX_TLS": os.environ.get("UCX_TLS")},
        "pool_dir": args.pool_dir or segment_mod.SHM_DIR,
        "pool_dir_mount": _mount_options(args.pool_dir or segment_mod.SHM_DIR),
        "results_gbps": results,
        "request_push_gbps": {
            "what": f"{REQ_CHUNKS} chunks of {REQ_CHUNK_BYTES} bytes in one push (memcpy: the same bytes at once)",
            **request,
        },
        "ratios_median": ratios,
        "goals": goals,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "transfer_quick" if args.quick else "transfer"
    if args.pool_dir:
        name += "_pooldir"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(
        json.dumps(
            {"results_gbps": results, "request_push_gbps": request, "ratios_median": ratios, "goals": goals},
            indent=1,
        )
    )
    _plot(results, sizes, paths, RESULTS / f"{name}.png")


def _mount_options(path: str) -> str:
    """The mount options of the filesystem holding ``path`` (tmpfs ``huge=`` shows there), or ''."""
    best, opts = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, opts = parts[1], f"{parts[2]} {parts[3]}"
    except OSError:
        pass
    return opts


def _plot(results: dict, sizes: list[int], paths: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(paths)
    for i, p in enumerate(paths):
        xs = [j + i * width for j in range(len(sizes))]
        ax.bar(xs, [results[p][f"{s}MiB"]["median_gbps"] for s in sizes], width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"{s} MiB" for s in sizes])
    ax.set_ylabel("GB/s (median round)")
    ax.set_title("pdmesh transfer: one chunk per push, loopback, 2-core VM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
