"""Generated bad HTTP requests for ``bench/bench_fuzz.py``'s router phase: bodies (not JSON, wrong types for every
field, deep nesting, NaN, huge values, bad unicode, client-supplied internal fields), headers (content types,
encodings, lengths that lie, huge and many headers), sizes, methods and paths, raw protocol garbage
(:func:`gen_http`), and one case sent and classified (:func:`send_http`)."""

from __future__ import annotations

import json
import random
import socket

import httpx

from pdmesh.security import TOKEN_HEADER

MODEL = "pdmesh-tiny-llama"  # the served model name the cases (and the benchmark's cluster) use

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
