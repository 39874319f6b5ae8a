"""Router overhead: direct-to-worker vs the pdmesh router vs the Rust ``vllm-router``, same fake workers, one run.

Setup (every piece its own process, all on 127.0.0.1): two fake OpenAI/vLLM workers (a raw asyncio HTTP/1.1
server: /health, /metrics, /v1/completions with the stock NIXL PD fields, stream and non-stream), the pdmesh
router in ``nixl`` PD mode (the protocol the Rust router speaks) with the workers as static config entries,
and ``vllm-router --vllm-pd-disaggregation``. The load generator is ``wrk`` (C; one thread): concurrency 1 for
the added latency (p50/p99 beside direct), concurrency 32 for max requests/s. Both routers run two legs per
request (prefill, then decode); "direct" is one request straight to the decode worker.

    python bench/bench_router.py [--quick] [--vllm-router PATH] [--wrk PATH]

Writes bench/results/router.json and router.png. Without the Rust binary (``--vllm-router`` or
``$PDMESH_VLLM_ROUTER``, default /root/.cache/pdmesh/venv-vllm-router/bin/vllm-router) its rows are skipped
with a note in the JSON. The VM's speed swings between runs: quote the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdmesh.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_RUST = "/root/.cache/pdmesh/venv-vllm-router/bin/vllm-router"
STREAM_TOKENS = 8

# ----------------------------------------------------------------------------------------------- fake worker


def _json_response(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


_PREFILL = _json_response(
    json.dumps(
        {
            "id": "p",
            "object": "text_completion",
            "model": "m",
            "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
            "kv_transfer_params": {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_engine_id": "e",
                "remote_block_ids": [1, 2],
                "remote_host": "127.0.0.1",
                "remote_port": 1,
            },
        }
    ).encode()
)
_DECODE = _json_response(
    json.dumps(
        {
            "id": "d",
            "object": "text_completion",
            "model": "m",
            "choices": [{"index": 0, "text": " ".join(["tok"] * STREAM_TOKENS), "finish_reason": "length"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": STREAM_TOKENS, "total_tokens": 16},
        }
    ).encode()
)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


_STREAM = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"".join(
        _chunk(b'data: {"id":"d","object":"text_completion","choices":[{"index":0,"text":"tok "}]}\n\n')
        for _ in range(STREAM_TOKENS)
    )
    + _chunk(b"data: [DONE]\n\n")
    + b"0\r\n\r\n"
)
_OK = _json_response(b'{"status":"ok"}')
_METRICS = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n\r\n"
_MODELS = _json_response(b'{"object":"list","data":[{"id":"m","object":"model","max_model_len":4096}]}')


class _FakeWorker(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive server: answers from the request line and the body's PD fields."""

    def connection_made(self, transport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end]
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            length = int(m.group(1)) if m else 0
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            body, self.buf = self.buf[head_end + 4 : end], self.buf[end:]
            self.t.write(self._answer(head.split(b" ", 2), body))

    @staticmethod
    def _answer(line: list[bytes], body: bytes) -> bytes:
        method, path = line[0], line[1]
        if method == b"GET":
            return (
                _METRICS
                if path.startswith(b"/metrics")
                else _MODELS
                if path.startswith(b"/v1/models")
                else _OK
            )
        if b'"do_remote_decode": true' in body or b'"do_remote_decode":true' in body:
            return _PREFILL
        if b'"stream": true' in body or b'"stream":true' in body:
            return _STREAM
        return _DECODE


def serve_fake(port: int) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_FakeWorker, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------------ processes


def wait_http(url: str, timeout: float = 60.0, ok_codes: tuple[int, ...] = (200,)) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=1.0, trust_env=False)
            if r.status_code in ok_codes:
                return
            last = r.status_code
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready: {last}")


class Procs:
    """Owns spawned processes; ``stop()`` kills each process group (also on errors)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], log: Path) -> subprocess.Popen:
        f = open(log, "wb")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


def write_router_config(path: Path, port: int, prefill: str, decode: str, processes: int = 1) -> None:
    path.write_text(
        json.dumps(
            {
                "router": {
                    "port": port,
                    "processes": processes,
                    "pd_mode": "nixl",
                    "log_level": "warning",
                    "discovery": {
                        "static": [
                            {"url": prefill, "role": "prefill", "models": ["m"]},
                            {"url": decode, "role": "decode", "models": ["m"]},
                        ]
                    },
                    "health_check": {"interval_s": 5},
                }
            }
        )
    )


def serve_router(config: str) -> None:
    from pdmesh.router.config import load_router_config
    from pdmesh.router.main import run_router

    run_router(load_router_config(config))


# ----------------------------------------------------------------------------------------------------- load

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"cannot parse latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(wrk: str, url: str, body: dict, conns: int, seconds: float, workdir: Path) -> dict:
    script = workdir / "post.lua"
    payload = json.dumps(body).replace("\\", "\\\\").replace("'", "\\'")
    script.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{payload}'\nwrk.headers['Content-Type'] = 'application/json'\n"
    )
    out = subprocess.run(
        [wrk, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    pct = dict(re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.M))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if not (pct and rps and total):
        raise RuntimeError(f"wrk output not understood:\n{out}")
    return {
        "p50_ms": round(_ms(pct["50"]), 4),
        "p99_ms": round(_ms(pct["99"]), 4),
        "rps": round(float(rps.group(1)), 1),
        "requests": int(total.group(1)),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else None,
    }


# ------------------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (< 20 s)")
    ap.add_argument("--vllm-router", default=os.environ.get("PDMESH_VLLM_ROUTER", DEFAULT_RUST))
    ap.add_argument("--wrk", default=os.environ.get("PDMESH_WRK", shutil.which("wrk") or "wrk"))
    ap.add_argument("--out", default=str(RESULTS / "router.json"))
    ap.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="also measure the pdmesh router with this many processes (default: one per core)",
    )
    ap.add_argument("--serve-fake", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-router", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_fake:
        serve_fake(args.serve_fake)
        return 0
    if args.serve_router:
        serve_router(args.serve_router)
        return 0
    if not shutil.which(args.wrk):
        print("bench_router: wrk not found (apt-get install wrk, or --wrk PATH)", file=sys.stderr)
        return 2
    c1_s, c32_s = (1, 2) if args.quick else (4, 6)
    rust = args.vllm_router if shutil.which(args.vllm_router) else None
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="pdmesh-bench-router-"))
    results: dict = {
        "setup": {
            "load": "wrk -t1, POST /v1/completions (max_tokens 8)",
            "concurrency_latency": 1,
            "concurrency_throughput": 32,
            "seconds": {"c1": c1_s, "c32": c32_s},
            "stream_chunks": STREAM_TOKENS + 1,
            "workers": "raw asyncio HTTP/1.1 fake vLLM (prefill answers kv_transfer_params), one process each",
            "routers": "PD mode on both: prefill leg then decode leg; direct = decode worker only; "
            "pdmesh = one router process, pdmesh_<N>proc = N processes on the port (SO_REUSEPORT)",
            "cpus": os.cpu_count(),
            "quick": args.quick,
        },
        "targets": {},
    }
    try:
        py = sys.executable
        me = str(Path(__file__).resolve())
        p_port, d_port, r_port, rust_port = (free_port() for _ in range(4))
        prefill, decode = f"http://127.0.0.1:{p_port}", f"http://127.0.0.1:{d_port}"
        procs.spawn([py, me, "--serve-fake", str(p_port)], work / "prefill.log")
        procs.spawn([py, me, "--serve-fake", str(d_port)], work / "decode.log")
        wait_http(prefill + "/health")
        wait_http(decode + "/health")
        targets = {"direct": decode}
        for n in sorted({1, args.processes}):
            name = "pdmesh" if n == 1 else f"pdmesh_{n}proc"
            port = r_port if n == 1 else free_port()
            cfg = work / f"router-{n}.yaml"
            write_router_config(cfg, port, prefill, decode, processes=n)
            procs.spawn([py, me, "--serve-router", str(cfg)], work / f"{name}.log")
            targets[name] = f"http://127.0.0.1:{port}"
            for _ in range(4 * n):  # every process is up (fresh connections spread over them)
                wait_http(targets[name] + "/health")
        if rust:
            procs.spawn(
                [
                    rust,
                    "--vllm-pd-disaggregation",
                    "--prefill",
                    prefill,
                    "--decode",
                    decode,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(rust_port),
                    "--policy",
                    "round_robin",
                    "--log-level",
                    "warning",
                ],
                work / "vllm-router.log",
            )
            targets["vllm_router"] = f"http://127.0.0.1:{rust_port}"
            wait_http(targets["vllm_router"] + "/health", ok_codes=(200,))
        else:
            results["vllm_router_note"] = (
                f"vllm-router not found at {args.vllm_router}: Rust comparison skipped "
                "(python3 -m venv /root/.cache/pdmesh/venv-vllm-router && "
                "/root/.cache/pdmesh/venv-vllm-router/bin/pip install vllm-router==0.1.17)"
            )
        for mode in ("non_stream", "stream"):
            body = {"model": "m", "prompt": "hello world " * 16, "max_tokens": STREAM_TOKENS}
            if mode == "stream":
                body["stream"] = True
            for name, base in targets.items():
                url = base + "/v1/completions"
                run_wrk(args.wrk, url, body, 4, 1, work)  # warm-up: connections, caches
                row = {
                    "c1": run_wrk(args.wrk, url, body, 1, c1_s, work),
                    "c32": run_wrk(args.wrk, url, body, 32, c32_s, work),
                }
                results["targets"].setdefault(name, {})[mode] = row
                print(
                    f"{mode:10s} {name:12s} c1 p50 {row['c1']['p50_ms']:.3f} ms  c32 {row['c32']['rps']:.0f} req/s"
                )
        results["summary"] = summarize(results["targets"])
    finally:
        procs.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["summary"], indent=2))
    return 0


def summarize(t: dict) -> dict:
    out: dict = {}
    for mode in ("non_stream", "stream"):
        direct = t["direct"][mode]
        s: dict = {}
        for name in t:
            if name == "direct":
                continue
            r = t[name][mode]
            s[name] = {
                "added_p50_ms_c1": round(r["c1"]["p50_ms"] - direct["c1"]["p50_ms"], 3),
                "added_p99_ms_c1": round(r["c1"]["p99_ms"] - direct["c1"]["p99_ms"], 3),
                "added_p50_ms_c32": round(r["c32"]["p50_ms"] - direct["c32"]["p50_ms"], 3),
                "added_p99_ms_c32": round(r["c32"]["p99_ms"] - direct["c32"]["p99_ms"], 3),
                "rps_c32": r["c32"]["rps"],
                "rps_vs_direct": round(r["c32"]["rps"] / direct["c32"]["rps"], 3),
            }
        if "vllm_router" in s:
            rust = s["vllm_router"]["rps_c32"]
            for name in [n for n in s if n.startswith("pdmesh")]:
                s[f"{name}_rps_vs_vllm_router"] = round(s[name]["rps_c32"] / rust, 3)
            best = max(
                (n for n in s if n.startswith("pdmesh") and "_vs_" not in n), key=lambda n: s[n]["rps_c32"]
            )
            s["goal_rps_ratio_0.5_met"] = s[f"{best}_rps_vs_vllm_router"] >= 0.5
            s["goal_rps_ratio_best_config"] = best
        s["goal_added_p50_1ms_met"] = s["pdmesh"]["added_p50_ms_c1"] <= 1.0
        out[mode] = s
    return out


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    t = results["targets"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (
        ("p50_ms", "c1", "p50 latency at concurrency 1 (ms)", list(t)),
        # direct (one leg, no router) is ~20x any router: left out so the routers can be compared
        ("rps", "c32", "requests/s at concurrency 32 (routers)", [n for n in t if n != "direct"]),
    )
    for ax, (key, conc, label, names) in zip(axes, panels, strict=True):
        width = 0.38
        for i, mode in enumerate(("non_stream", "stream")):
            vals = [t[n][mode][conc][key] for n in names]
            bars = ax.bar([x + i * width for x in range(len(names))], vals, width, label=mode)
            ax.bar_label(bars, fmt="%.2f" if key == "p50_ms" else "%.0f", fontsize=7)
        ax.set_xticks([x + width / 2 for x in range(len(names))], names)
        ax.set_title(label)
        ax.legend()
    fig.suptitle("Router overhead on fake workers (PD: prefill + decode legs; direct = decode only)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
