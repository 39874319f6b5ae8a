"""Requests for correctness tests, the reference engine they are checked against, and how to read token ids out
of any OpenAI response shape."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator

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


@contextlib.contextmanager
def reference_engine(
    model: str, args: list[str], log_dir: object, env: dict[str, str] | None = None
) -> Iterator[tuple[str, httpx.Client]]:
    """One plain vLLM server (no connector) with ``args``, healthy, as (url, client); stopped on exit. The oracle:
    a cluster run with the same model and args must answer with its tokens."""
    from pdmesh.procs import free_port
    from pdmesh.worker.vllm_process import VLLMServer, VLLMServerSpec, detect_device

    spec = VLLMServerSpec(
        model=model, host="127.0.0.1", port=free_port(), served_model_name=MODEL, kv_transfer_config=None,
        extra_args=args, env=dict(env or {}), device=detect_device(),
    )  # fmt: skip
    server = VLLMServer(spec, log_path=f"{log_dir}/vllm.log")
    try:
        server.wait_healthy(300)
        with httpx.Client(timeout=300, trust_env=False) as c:
            yield server.url, c
    finally:
        server.stop()


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
