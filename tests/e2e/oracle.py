"""Requests for correctness tests and how to read token ids out of any OpenAI response shape."""

from __future__ import annotations

import json
import random

import httpx

MODEL = "pdmesh-tiny-llama"
# Vocabulary of the generated test prompts (any words work; the oracle is a single engine, not the text).
WORDS = [
    "cache",
    "block",
    "token",
    "layer",
    "prefill",
    "decode",
    "router",
    "worker",
    "stream",
    "memory",
    "page",
    "tensor",
    "lease",
]


def make_requests() -> list[tuple[str, dict]]:
    """(path, body) pairs: completions and chat, short and multi-block prompts, stream and non-stream."""
    rng = random.Random(7)
    words = WORDS

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    reqs: list[tuple[str, dict]] = []
    for i, n in enumerate([3, 12, 40, 90, 150, 260, 420, 700]):
        stream = i % 2 == 1
        reqs.append(
            ("/v1/completions", {"model": MODEL, "prompt": text(n), "max_tokens": 12 + i, "stream": stream})
        )
        msgs = [{"role": "system", "content": text(5)}, {"role": "user", "content": text(n)}]
        reqs.append(
            (
                "/v1/chat/completions",
                {"model": MODEL, "messages": msgs, "max_tokens": 10 + i, "stream": not stream},
            )
        )
    for _path, body in reqs:
        body.update(temperature=0, return_token_ids=True)
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
    return reqs


def token_ids(path: str, body: dict, base_url: str, client: httpx.Client | None = None) -> list[int]:
    """Send one request; return the generated token ids (streamed chunks concatenated)."""
    c = client or httpx.Client(timeout=300, trust_env=False)
    try:
        if not body.get("stream"):
            r = c.post(base_url + path, json=body)
            r.raise_for_status()
            choice = r.json()["choices"][0]
            return list(choice["token_ids"])
        ids: list[int] = []
        with c.stream("POST", base_url + path, json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error']}")
                for choice in event.get("choices", []):
                    ids += choice.get("token_ids") or []
        return ids
    finally:
        if client is None:
            c.close()


def scrape(metrics_text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
