"""Turn a request into :class:`PromptInfo` (chunk keys + token count) for cache-aware routing.

Token ids come, in order of preference, from the prompt itself (completions with token ids), from a bounded
cache of earlier tokenizations, or from ``POST {worker}/tokenize`` on a healthy worker of the model's pool
(vLLM: ``{"model", "prompt"}`` or ``{"model", "messages", ...}`` -> ``{"tokens": [...]}``; for messages vLLM
applies the chat template, so the keys cover the full templated prompt). The call is bounded by
``tokenize_timeout_s``; when it fails, or with ``tokenizer: chars``, the prompt falls back to text-chunk keys
(:func:`router.prompt_keys.text_info`), and a worker that failed to tokenize is not asked again for 30 s.
"""

from __future__ import annotations

import json
import time
from array import array
from collections import OrderedDict
from hashlib import blake2b

import httpx

from pdmesh.router.config import CacheAwareConfig
from pdmesh.router.prompt_keys import PromptInfo, prompt_token_ids, text_info, token_info
from pdmesh.router.registry import Worker

# every request field that changes the engine's prompt token ids (forwarded to /tokenize)
_TEMPLATE_FIELDS = (
    "tools",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "documents",
    "mm_processor_kwargs",
)
_RETRY_TOKENIZE_S = 30.0


class TokenCache:
    """LRU of prompt digest -> token ids, bounded by the total number of token ids kept."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.size = 0
        self._items: OrderedDict[bytes, array] = OrderedDict()

    def get(self, digest: bytes) -> array | None:
        ids = self._items.get(digest)
        if ids is not None:
            self._items.move_to_end(digest)
        return ids

    def put(self, digest: bytes, ids: array) -> None:
        if len(ids) > self.max_tokens or digest in self._items:
            return
        self._items[digest] = ids
        self.size += len(ids)
        while self.size > self.max_tokens:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)


def _tokenize_body(model: str, body: dict) -> dict:
    if "messages" in body:
        out = {"model": model, "messages": body["messages"]}
        out.update({k: body[k] for k in _TEMPLATE_FIELDS if k in body})
        return out
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0]
    return {"model": model, "prompt": prompt}


class PromptAnalyzer:
    def __init__(self, cfg: CacheAwareConfig, client: httpx.AsyncClient) -> None:
        self.cfg = cfg
        self.client = client
        self.cache = TokenCache(cfg.tokenize_cache_tokens)
        self._no_tokenize_until: dict[str, float] = {}

    async def analyze(self, model: str, body: dict, workers: list[Worker]) -> PromptInfo:
        """Never raises for tokenizer trouble (falls back to text keys); bounded by the tokenize timeout."""
        ids = prompt_token_ids(body)
        if ids is not None:
            return token_info(model, ids, self.cfg.chunk_tokens, body)
        if self.cfg.tokenizer == "chars":
            return text_info(model, body, self.cfg.chunk_chars)
        req = _tokenize_body(model, body)
        digest = blake2b(json.dumps(req, sort_keys=True).encode(), digest_size=16).digest()
        cached = self.cache.get(digest)
        if cached is not None:
            return token_info(model, cached, self.cfg.chunk_tokens, body)
        tokens = await self._tokenize(req, workers)
        if tokens is None:
            return text_info(model, body, self.cfg.chunk_chars)
        self.cache.put(digest, tokens)
        return token_info(model, tokens, self.cfg.chunk_tokens, body)

    async def _tokenize(self, req: dict, workers: list[Worker]) -> array | None:
        now = time.monotonic()
        usable = [w for w in workers if self._no_tokenize_until.get(w.url, 0.0) <= now]
        if not usable:
            return None
        worker = min(usable, key=lambda w: w.in_flight)
        try:
            r = await self.client.post(
                worker.url + "/tokenize", json=req, timeout=self.cfg.tokenize_timeout_s
            )
            if 400 <= r.status_code < 500 and r.status_code != 404:
                return None  # this prompt's problem (vLLM will say so on the leg), not the tokenizer's
            tokens = r.json().get("tokens") if r.status_code == 200 else None
            if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens):
                return array("i", tokens)
        except (httpx.HTTPError, ValueError, AttributeError, OverflowError):
            pass
        self._no_tokenize_until[worker.url] = now + _RETRY_TOKENIZE_S
        return None
