"""Chunk keys of a prompt for cache-aware routing (the router's own keys, not the tier's).

key(i) = blake2b-128(key(i-1) || chunk i), seeded by the model name, so equal prefixes of the same model give
equal leading keys on any router replica (never Python's ``hash()``). Only full chunks get a key. Two kinds:

- token keys: chunks of ``chunk_tokens`` token ids (exact: the ids come from the worker's ``/tokenize`` of the
  full templated prompt, or from a completion prompt that already is token ids);
- text keys: chunks of ``chunk_chars`` characters of a canonical rendering of the whole prompt (every message
  with its role, tools and template arguments), used when tokenization is off or unavailable. A changed
  earlier message changes every later key, as with real templating.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b

# Rough characters per token, to turn text chunks into a token estimate (conditional disaggregation).
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class PromptInfo:
    """What the router knows about a prompt: its chunk keys, its (estimated) length in tokens."""

    keys: list[bytes]
    n_tokens: int
    tokens_per_key: int
    exact: bool  # True: token ids from the worker's tokenizer; False: text chunks, n_tokens estimated
    token_ids: array | None = None  # kept only for the tiers' /lookup


def model_seed(model: str) -> bytes:
    return blake2b(b"pdmesh-router-keys-v1\0" + model.encode(), digest_size=16).digest()


def token_keys(seed: bytes, token_ids: Sequence[int], chunk_tokens: int) -> list[bytes]:
    ids = token_ids if isinstance(token_ids, array) and token_ids.typecode == "i" else array("i", token_ids)
    raw = ids.tobytes()
    step = chunk_tokens * ids.itemsize
    keys, prev = [], seed
    for start in range(0, len(raw) - step + 1, step):
        prev = blake2b(prev + raw[start : start + step], digest_size=16).digest()
        keys.append(prev)
    return keys


def text_keys(seed: bytes, text: str, chunk_chars: int) -> list[bytes]:
    keys, prev = [], seed
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        prev = blake2b(prev + text[start : start + chunk_chars].encode(), digest_size=16).digest()
        keys.append(prev)
    return keys


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                parts.append(json.dumps(part, sort_keys=True, separators=(",", ":")))
        return "".join(parts)
    return "" if content is None else json.dumps(content, sort_keys=True, separators=(",", ":"))


def templated_text(body: dict) -> str:
    """A canonical stand-in for the templated prompt: prompt text, or every message (role + content +
    tool calls), preceded by the tools and template arguments, which a chat template renders first."""
    if "messages" not in body:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else json.dumps(prompt)
    out = []
    for extra in ("tools", "chat_template", "chat_template_kwargs"):
        if body.get(extra) is not None:
            out.append(f"<|{extra}|>" + json.dumps(body[extra], sort_keys=True, separators=(",", ":")))
    for m in body["messages"]:
        if not isinstance(m, dict):
            continue
        out.append(f"<|{m.get('role', '')}|>{_content_text(m.get('content'))}")
        if m.get("tool_calls") is not None:
            out.append(json.dumps(m["tool_calls"], sort_keys=True, separators=(",", ":")))
    return "\n".join(out)


def prompt_token_ids(body: dict) -> list[int] | None:
    """Token ids when a completion prompt is given as ids already (no tokenization needed)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int):
            return prompt
        if isinstance(first, list) and len(prompt) == 1:
            return first
    return None


def text_info(model: str, body: dict, chunk_chars: int) -> PromptInfo:
    text = templated_text(body)
    return PromptInfo(
        keys=text_keys(model_seed(model), text, chunk_chars),
        n_tokens=max(1, len(text) // CHARS_PER_TOKEN),
        tokens_per_key=max(1, chunk_chars // CHARS_PER_TOKEN),
        exact=False,
    )


def token_info(model: str, token_ids: Sequence[int], chunk_tokens: int) -> PromptInfo:
    ids = token_ids if isinstance(token_ids, array) else array("i", token_ids)
    return PromptInfo(
        keys=token_keys(model_seed(model), ids, chunk_tokens),
        n_tokens=len(ids),
        tokens_per_key=chunk_tokens,
        exact=True,
        token_ids=ids,
    )
