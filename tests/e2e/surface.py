"""The OpenAI request fields users rely on, sent to a single engine and through PD: what must come back equal.

Each case is (name, path, body). :func:`answer` sends one and reduces the response to what must match: the
status; per choice index its token ids, text, finish reason and logprobs (floats to 1e-3: the decode side
computes from pushed KV, bit-identical to what it would have computed, but a different batch may change the last
bits of a logit); usage. Streams are reduced the same way (chunks concatenated per index; the final usage chunk;
whether every chunk carried usage when ``continuous_usage_stats`` was asked).
"""

from __future__ import annotations

import json
import math
import random

import httpx

from tests.e2e.oracle import MODEL, WORDS

_rng = random.Random(41)


def _text(n: int) -> str:
    return " ".join(_rng.choice(WORDS) for _ in range(n))


P1, P2, P3 = _text(180), _text(40), _text(300)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_block",
            "description": "look up a block",
            "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
        },
    }
]
CHAT = [{"role": "user", "content": P1}]
BASE = {"model": MODEL, "temperature": 0, "return_token_ids": True}

CASES: list[tuple[str, str, dict]] = [
    ("n2-seeded", "/v1/completions", {**BASE, "prompt": P1, "n": 2, "temperature": 0.9, "seed": 7, "max_tokens": 8}),
    ("chat-n3-seeded", "/v1/chat/completions",
     {**BASE, "messages": CHAT, "n": 3, "temperature": 1.0, "seed": 3, "max_completion_tokens": 6}),
    ("batch", "/v1/completions", {**BASE, "prompt": [P1, P2, P3], "max_tokens": 6}),
    ("batch-n2-stream", "/v1/completions",
     {**BASE, "prompt": [P2, P3], "n": 2, "temperature": 0.7, "seed": 5, "max_tokens": 5, "stream": True,
      "stream_options": {"include_usage": True}}),
    ("batch-token-ids", "/v1/completions", {**BASE, "prompt": [[5, 6, 7, 8] * 40, [9, 10, 11] * 20], "max_tokens": 4}),
    ("echo-logprobs", "/v1/completions", {**BASE, "prompt": P2, "echo": True, "logprobs": 2, "max_tokens": 4}),
    ("prompt-logprobs", "/v1/completions", {**BASE, "prompt": P2, "prompt_logprobs": 1, "max_tokens": 2}),
    ("logprobs", "/v1/completions", {**BASE, "prompt": P3, "logprobs": 3, "max_tokens": 6}),
    ("chat-logprobs", "/v1/chat/completions", {**BASE, "messages": CHAT, "logprobs": True, "top_logprobs": 2,
                                                "max_tokens": 5}),
    ("stop", "/v1/completions", {**BASE, "prompt": P1, "stop": ["cache", "token"], "max_tokens": 24}),
    ("seed-sampled", "/v1/completions", {**BASE, "prompt": P3, "temperature": 1.2, "seed": 11, "max_tokens": 10}),
    ("json-object", "/v1/chat/completions",
     {**BASE, "messages": CHAT, "response_format": {"type": "json_object"}, "max_tokens": 12}),
    ("tools-required", "/v1/chat/completions",
     {**BASE, "messages": CHAT, "tools": TOOLS, "tool_choice": "required", "max_tokens": 16}),
    ("user-and-max-completion", "/v1/chat/completions",
     {**BASE, "messages": CHAT, "user": "someone", "max_completion_tokens": 7}),
    ("continuous-usage", "/v1/chat/completions",
     {**BASE, "messages": CHAT, "max_tokens": 5, "stream": True,
      "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
]  # fmt: skip


def _choice(c: dict) -> dict:
    message = c.get("message") or {}
    return {
        "token_ids": c.get("token_ids"),
        "text": c.get("text", message.get("content")),
        "tool_calls": [tc.get("function") for tc in message.get("tool_calls") or []],
        "finish_reason": c.get("finish_reason"),
        "logprobs": c.get("logprobs"),
        "prompt_logprobs": c.get("prompt_logprobs"),
    }


def answer(url: str, path: str, body: dict, client: httpx.Client) -> dict:
    """The comparable reduction of one response (see the module docstring)."""
    if not body.get("stream"):
        r = client.post(url + path, json=body)
        if r.status_code != 200:
            return {"status": r.status_code}
        out = r.json()
        choices = sorted(out["choices"], key=lambda c: c["index"])
        return {
            "status": 200,
            "choices": {c["index"]: _choice(c) for c in choices},
            "prompt_logprobs": out.get("prompt_logprobs"),
            "usage": {k: out["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
        }
    merged: dict[int, dict] = {}
    usage, chunks, chunks_with_usage = None, 0, 0
    with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event.get("choices"):
                chunks += 1
                chunks_with_usage += bool(event.get("usage"))
            elif event.get("usage"):
                usage = {k: event["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
            for c in event.get("choices", []):
                m = merged.setdefault(c["index"], {"token_ids": [], "text": "", "finish_reason": None})
                m["token_ids"] += c.get("token_ids") or []
                m["text"] += c.get("text", (c.get("delta") or {}).get("content") or "")
                m["finish_reason"] = c.get("finish_reason") or m["finish_reason"]
    continuous = bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
    return {
        "status": 200,
        "choices": dict(sorted(merged.items())),
        "usage": usage,
        "usage_on_every_chunk": chunks_with_usage == chunks if continuous else None,
    }


def same(a: object, b: object, tol: float = 1e-3) -> bool:
    """Equal, floats to ``tol`` (``-inf`` equals itself)."""
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tol)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, tol) for x, y in zip(a, b, strict=True))
    return a == b
