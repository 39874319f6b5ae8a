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
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmesh.cluster import ClusterSpec, LocalCluster
from pdmesh.frames import encode_frame, recv_frame
from pdmesh.procs import free_port
from pdmesh.security import TOKEN_HEADER
from pdmesh.transfer.peer_auth import client_handshake
from pdmesh.transfer.protocol import PROTOCOL_VERSION

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "fuzz-cluster-secret"
MODEL = "pdmesh-tiny-llama"
TRANSFER_FP = "pdmesh-kv-v1"


# -- router: generated HTTP cases ----------------------------------------------------------------------------
WEIRD = [
    None, True, False, 0, -1, 1.5, -0.0, 2**63, -(2**63), 2**64 + 1, 1e308, -1e308, "", "x", "NaN", "1",
    "\u0000", "\ud800", "😀" * 100, "x" * 100_000, [], [None], [[]], [1, 2, 3] * 1000, {}, {"a": {"b": {"c": 1}}},
    [10**9], [-1], [{"role": "user"}], {"type": "json_schema"},
]  # fmt: skip
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
    "stream", "stream_options", "stop", "logprobs", "top_logprobs", "echo", "seed", "user", "logit_bias",
    "response_format", "tools", "tool_choice", "presence_penalty", "frequency_penalty", "best_of", "suffix",
    "min_tokens", "kv_transfer_params", "vllm_xargs", "prompt_logprobs", "guided_json", "ignore_eos",
]  # fmt: skip
PATHS = ["/v1/completions", "/v1/chat/completions"]


def base_body(path: str) -> dict:
    if path.endswith("chat/completions"):
        return {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3}
    return {"model": MODEL, "prompt": "hello world", "max_tokens": 3}


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


class HttpCase:
    """One request: either through httpx (method, path, headers, body) or raw bytes on a socket."""

    def __init__(self, kind: str, method="POST", path="/v1/completions", headers=None, body=b"", raw=None):
        self.kind, self.method, self.path = kind, method, path
        self.headers = headers if headers is not None else {"content-type": "application/json"}
        self.body, self.raw = body, raw


def gen_http(rng: random.Random) -> HttpCase:
    path = rng.choice(PATHS)
    body = base_body(path)
    j = lambda b: json.dumps(b).encode()  # noqa: E731
    pick = rng.random()
    if pick < 0.35:  # one field of a valid request with a weird value
        field = rng.choice(FIELDS)
        value = rng.choice(WEIRD)
        body[field] = value
        if field not in ("max_tokens", "max_completion_tokens", "n", "best_of", "min_tokens"):
            body.setdefault("max_tokens", 3)
        if field == "n" and isinstance(value, int) and not isinstance(value, bool) and value > 4:
            body[field] = 10**6  # an absurd n, never a real fan-out of thousands
        return HttpCase(f"field:{field}", path=path, body=j(body))
    if pick < 0.42:  # required things missing or messages malformed
        variant = rng.choice(["no-model", "no-input", "bad-role", "content-none", "content-parts", "empty"])
        if variant == "no-model":
            body.pop("model")
        elif variant == "no-input":
            body.pop("prompt", None)
            body.pop("messages", None)
        elif variant == "empty":
            body = {}
        else:
            path = "/v1/chat/completions"
            body = base_body(path)
            msg = body["messages"][0]
            if variant == "bad-role":
                msg["role"] = rng.choice(["", "root", 7, None])
            elif variant == "content-none":
                msg["content"] = None
            else:
                msg["content"] = [
                    rng.choice([{"type": "nope"}, {"type": "text"}, {"type": "text", "text": 5}, 3])
                ]
        return HttpCase(f"missing:{variant}", path=path, body=j(body))
    if pick < 0.6:  # bodies that are not a valid JSON object
        variant = rng.choice(
            ["bytes", "truncated", "array", "number", "string", "null", "deep", "nan", "bom", "utf16", "latin1",
             "dupkeys", "trailing", "zero", "whitespace", "huge-int"]
        )  # fmt: skip
        raw = j(body)
        data = {
            "bytes": bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))),
            "truncated": raw[: rng.randrange(1, len(raw))],
            "array": b"[1, 2, 3]",
            "number": b"42",
            "string": b'"prompt"',
            "null": b"null",
            "deep": _deep(rng.choice([100, 10_000, 200_000])),
            "nan": raw.replace(b'"max_tokens": 3', b'"max_tokens": 3, "temperature": NaN'),
            "bom": b"\xef\xbb\xbf" + raw,
            "utf16": json.dumps(body).encode("utf-16"),
            "latin1": raw.replace(b"hello", b"h\xe9llo\xff"),
            "dupkeys": raw[:-1] + b', "model": 5}',
            "trailing": raw + b"garbage",
            "zero": b"",
            "whitespace": b" \n\t " * 1000,
            "huge-int": raw.replace(b'"max_tokens": 3', b'"max_tokens": ' + b"9" * 5000),
        }[variant]
        return HttpCase(f"body:{variant}", path=path, body=data)
    if pick < 0.72:  # headers
        variant = rng.choice(
            ["no-ctype", "text-plain", "multipart", "charset-utf16", "gzip-garbage", "br", "huge-header",
             "many-headers", "bad-auth", "internal-token", "accept-weird"]
        )  # fmt: skip
        h = {"content-type": "application/json"}
        if variant == "no-ctype":
            h = {}
        elif variant == "text-plain":
            h["content-type"] = "text/plain"
        elif variant == "multipart":
            h["content-type"] = "multipart/form-data; boundary=x"
        elif variant == "charset-utf16":
            h["content-type"] = "application/json; charset=utf-16"
        elif variant == "gzip-garbage":
            h["content-encoding"] = "gzip"
        elif variant == "br":
            h["content-encoding"] = "br"
        elif variant == "huge-header":
            h["x-junk"] = "a" * rng.choice([10_000, 100_000])
        elif variant == "many-headers":
            h.update({f"x-h{i}": "v" for i in range(rng.choice([200, 2000]))})
        elif variant == "bad-auth":
            h["authorization"] = rng.choice(["Bearer", "Basic ???", "Bearer " + "x" * 5000])
        elif variant == "internal-token":
            h[TOKEN_HEADER] = "guess"
        else:
            h["accept"] = "application/x-nonsense"
        return HttpCase(f"header:{variant}", path=path, headers=h, body=j(body))
    if pick < 0.84:  # methods and paths
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "POST"])
        p = rng.choice(
            ["/v1/completions", "/v1/chat/completions", "/", "/v1", "/v1/../internal/workers", "/internal/workers",
             "/internal/workers/x", "/%00", "/v1/completions?x=" + "y" * 5000, "/" + "a" * 10_000, "/metrics",
             "/v1/models/../../etc/passwd", "/v1/completions/", "//v1//completions"]
        )  # fmt: skip
        return HttpCase(f"method:{method}", method=method, path=p, body=j(body) if method != "GET" else b"")
    if pick < 0.92:  # sizes
        n = rng.choice([9 << 20, 64 << 20, 1 << 20, 8 << 20])
        big = dict(body, prompt="word " * (n // 5)) if "prompt" in body else body
        return HttpCase(f"size:{n >> 20}MiB", path=path, body=j(big))
    variant = rng.choice(
        ["garbage", "http09", "h2-preface", "long-line", "cl-lies", "cl-negative", "cl-twice", "te-bad-chunk",
         "te-and-cl", "bad-version", "header-no-colon", "nul-in-header"]
    )  # fmt: skip
    raw = j(body)
    req = {
        "garbage": bytes(rng.randrange(256) for _ in range(200)),
        "http09": b"GET /\r\n\r\n",
        "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "long-line": b"POST /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "cl-lies": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n" + raw,
        "cl-negative": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n" + raw,
        "cl-twice": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: "
        + str(len(raw)).encode()
        + b"\r\n\r\n"
        + raw,
        "te-bad-chunk": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n"
        + raw
        + b"\r\n0\r\n\r\n",
        "te-and-cl": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4"
        b"\r\n\r\n0\r\n\r\n",
        "bad-version": b"POST /v1/completions HTTP/7.3\r\nHost: x\r\n\r\n",
        "header-no-colon": b"POST /v1/completions HTTP/1.1\r\nHost x\r\n\r\n",
        "nul-in-header": b"POST /v1/completions HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
    }[variant]
    return HttpCase(f"raw:{variant}", raw=req)


def send_http(url: str, case: HttpCase, client: httpx.Client) -> str:
    """The outcome: the status code as text, 'closed' (no response) or 'timeout'."""
    if case.raw is not None:
        host, port = url.split("//")[1].split(":")
        try:
            with socket.create_connection((host, int(port)), timeout=20) as s:
                s.sendall(case.raw)
                s.shutdown(socket.SHUT_WR) if case.kind != "raw:cl-lies" else None
                data = s.recv(64)
        except TimeoutError:
            return "timeout"
        except OSError:
            return "closed"
        if data.startswith(b"HTTP/1.1 ") or data.startswith(b"HTTP/1.0 "):
            return data[9:12].decode()
        return "closed"
    try:
        r = client.request(case.method, url + case.path, headers=case.headers, content=case.body)
    except httpx.TimeoutException:
        return "timeout"
    except httpx.TransportError:
        return "closed"
    json_error = r.headers.get("content-type", "").startswith("application/json")
    if r.status_code >= 400 and json_error and case.method != "HEAD":  # a HEAD answer has no body
        try:
            err = r.json()
            if not (isinstance(err, dict) and isinstance(err.get("error"), dict)):
                return f"{r.status_code}:not-openai-error"
        except ValueError:
            return f"{r.status_code}:bad-json"
    return str(r.status_code)


# -- binary listeners: malformed frames ----------------------------------------------------------------------
def _lp(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _rand_value(rng: random.Random, depth: int = 0):
    choices = [
        lambda: None, lambda: rng.randrange(-(2**63), 2**63), lambda: rng.random() * 1e300, lambda: float("nan"),
        lambda: float("inf"), lambda: "s" * rng.randrange(0, 300), lambda: bytes(rng.randrange(0, 40)),
        lambda: os.urandom(16), lambda: True, lambda: -1, lambda: 0, lambda: 2**64 - 1,
    ]  # fmt: skip
    if depth < 2:
        choices += [
            lambda: [_rand_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))],
            lambda: [os.urandom(16)] * rng.choice([1, 1000, 100_000]),
            lambda: {str(i): _rand_value(rng, depth + 1) for i in range(rng.randrange(0, 4))},
        ]
    return rng.choice(choices)()


TARGET_OPS = {
    "tier": [
        "lookup",
        "load",
        "alloc",
        "commit",
        "abort",
        "push",
        "pin",
        "unpin",
        "release",
        "stats",
        "clear",
        "x",
    ],
    "cache": ["put", "get", "contains", "delete", "clear", "stats", "hello", "y"],
    "transfer": ["alloc", "commit", "abort", "hello", "auth", "z"],
}
ARG_NAMES = ["keys", "nbytes", "lease_s", "peer", "transfer_id", "deadline_s", "tiers", "remote", "key", "fp", "n",
             "csum", "sizes", "lease_ms", "offsets", "token", "proof", "nonce", "v", "id"]  # fmt: skip


def gen_frames(rng: random.Random, target: str) -> tuple[str, bool, list[bytes]]:
    """(kind, authenticate first?, raw byte strings to send)."""
    if rng.random() < 0.45:  # pre-auth garbage
        variant = rng.choice(
            ["bytes", "huge-len", "zero-len", "bad-msgpack", "non-map", "short", "wrong-hello"]
        )
        if variant == "bytes":
            data = [os.urandom(rng.randrange(1, 64))]
        elif variant == "huge-len":
            data = [_lp(rng.choice([2**32 - 1, 1 << 24, 1 << 21])) + os.urandom(16)]
        elif variant == "zero-len":
            data = [_lp(0)]
        elif variant == "bad-msgpack":
            body = b"\xc1" + os.urandom(rng.randrange(0, 30))
            data = [_lp(len(body)) + body]
        elif variant == "non-map":
            body = msgpack.packb(rng.choice([[1, 2], 5, "hello", b"\x00" * 8, None]))
            data = [_lp(len(body)) + body]
        elif variant == "short":
            data = [_lp(100) + os.urandom(10)]
        else:
            msg = {"op": "hello", "id": 1, "token": _rand_value(rng), "proto": _rand_value(rng),
                   "v": _rand_value(rng), "fingerprint": _rand_value(rng), "backends": _rand_value(rng),
                   "nonce": _rand_value(rng)}  # fmt: skip
            data = [encode_frame(msg, 1 << 30)]
        return f"pre-auth:{variant}", False, data
    op = rng.choice(TARGET_OPS[target])
    msg = {"op": op, "id": rng.randrange(1 << 31)}
    for name in rng.sample(ARG_NAMES, rng.randrange(0, 6)):
        msg[name] = _rand_value(rng)
    try:
        frame = encode_frame(msg, 1 << 30)
    except Exception:
        frame = _lp(3) + b"\xc1\xc1\xc1"
    if rng.random() < 0.1:
        frame = frame[: rng.randrange(1, len(frame))]  # cut short, then close
    return f"post-auth:{op}", True, [frame]


class FrameTarget:
    """How to reach one binary listener, authenticate on it and check that it still serves correctly."""

    def __init__(
        self, name: str, connect: Callable[[], socket.socket], auth: Callable[[socket.socket], None]
    ):
        self.name, self.connect, self.auth = name, connect, auth


def tier_target(socket_path: str) -> FrameTarget:
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(socket_path)
        return s

    def auth(s: socket.socket) -> None:
        s.sendall(encode_frame({"id": 0, "op": "hello", "token": TOKEN}))
        reply = recv_frame(s, 1 << 20, time.monotonic() + 5)
        assert reply.get("ok"), reply

    return FrameTarget("tier-control", connect, auth)


def cache_target(host: str, port: int) -> FrameTarget:
    def connect() -> socket.socket:
        return socket.create_connection((host, port), timeout=5)

    def auth(s: socket.socket) -> None:
        s.sendall(encode_frame({"op": "hello", "proto": 1, "token": TOKEN}))
        reply = recv_frame(s, 1 << 20, time.monotonic() + 5)
        assert reply.get("ok"), reply

    return FrameTarget("cache-server", connect, auth)


def transfer_target(host: str, port: int) -> FrameTarget:
    def connect() -> socket.socket:
        return socket.create_connection((host, port), timeout=5)

    def auth(s: socket.socket) -> None:
        hello = {"op": "hello", "v": PROTOCOL_VERSION, "fingerprint": TRANSFER_FP, "backends": ["tcp"]}
        client_handshake(s, hello, "hello_ok", TOKEN, time.monotonic() + 5)

    return FrameTarget("transfer-receiver", connect, auth)


def send_frames(target: FrameTarget, authenticate: bool, frames: list[bytes]) -> str:
    """Outcome: 'reply:<ok|error kind>', 'closed', 'timeout' (no answer within 6 s: the server waits, allowed for
    a frame cut short) or 'auth-failed' (a correct client was refused: a finding)."""
    try:
        s = target.connect()
    except OSError:
        return "connect-failed"
    with s:
        s.settimeout(6)
        if authenticate:
            try:
                target.auth(s)
            except Exception as e:  # a correct client refused: reported
                return f"auth-failed:{type(e).__name__}"
        try:
            for f in frames:
                s.sendall(f)
            reply = recv_frame(s, 1 << 26, time.monotonic() + 6)
        except TimeoutError:
            return "timeout"
        except (OSError, ConnectionError):
            return "closed"
        except Exception:
            return "reply:undecodable"
    if reply.get("ok") is True or reply.get("op", "").endswith("_ok"):
        return "reply:ok"
    return f"reply:{reply.get('error') or reply.get('kind') or reply.get('op')}"


# -- the run --------------------------------------------------------------------------------------------------
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
        targets = [tier_target(info["socket"]), transfer_target(th, int(tp)), cache_target(ch, int(cp))]
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
