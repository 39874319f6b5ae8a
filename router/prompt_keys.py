"""Chunk keys of a prompt for cache-aware routing (the router's own keys, not the tier's).

key(i) = blake2b-128(key(i-1) || chunk i), seeded by the model name, so equal prefixes of the same model give
equal leading keys on any router replica (never Python's ``hash()``). Only full chunks get a key. Two kinds:

- token keys: chunks of ``chunk_tokens`` token ids (exact: the ids come from the worker's ``/tokenize`` of the
  full templated prompt, or from a completion prompt that already is token ids);
- text keys: chunks of ``chunk_chars`` characters of a canonical rendering of the whole prompt (every message
  with its role, tools and template arguments), used when tokenization is off or unavailable. A changed
  earlier message changes every later key, as with real templating.

Identity beyond text (:func:`input_scope`): a ``cache_salt`` and any non-text content (images, audio, video, whose
placeholder tokens are the same for different inputs) re-seed the chain, so two tenants' or two images' prompts
never look like one prefix to the router. The tiers' ``/lookup`` is asked only for prompts whose identity the tier
can key: with the salt passed on, never for non-text content (:attr:`PromptInfo.tier_lookup_ok`).
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b

from pdmesh.router.openai_requests import content_parts

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
    salt: str = ""  # the request's cache_salt, passed to the tiers' /lookup
    tier_lookup_ok: bool = True  # False: the tiers cannot key this prompt's identity (non-text content)


_TEXT_PART_TYPES = ("text", "input_text")


def media_parts(body: dict) -> list[dict]:
    """The chat messages' non-text content parts (images, audio, video, files), in order."""
    return [part for part in content_parts(body) if part.get("type") not in _TEXT_PART_TYPES]


def has_media(body: dict) -> bool:
    """True when a chat message carries non-text content."""
    return any(part.get("type") not in _TEXT_PART_TYPES for part in content_parts(body))


def input_scope(body: dict) -> str:
    """What besides the text re-seeds a prompt's keys: its ``cache_salt`` and a digest of its non-text content
    (``""`` for a plain prompt, whose keys do not change)."""
    salt = body.get("cache_salt")
    parts = []
    if isinstance(salt, str) and salt:
        parts.append("salt:" + salt)
    media = media_parts(body)
    if media:
        canon = json.dumps(media, sort_keys=True, separators=(",", ":"), default=str).encode()
        parts.append("media:" + blake2b(canon, digest_size=16).hexdigest())
    return "\n".join(parts)


def model_seed(model: str, scope: str = "") -> bytes:
    """The chain's seed: the model name, and the request's :func:`input_scope` when it has one."""
    raw = b"pdmesh-router-keys-v1\0" + model.encode()
    if scope:
        raw += b"\0scope\0" + scope.encode()
    return blake2b(raw, digest_size=16).digest()


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


def _salt(body: dict | None) -> str:
    salt = (body or {}).get("cache_salt")
    return salt if isinstance(salt, str) else ""


def text_info(model: str, body: dict, chunk_chars: int) -> PromptInfo:
    text = templated_text(body)
    return PromptInfo(
        keys=text_keys(model_seed(model, input_scope(body)), text, chunk_chars),
        n_tokens=max(1, len(text) // CHARS_PER_TOKEN),
        tokens_per_key=max(1, chunk_chars // CHARS_PER_TOKEN),
        exact=False,
        salt=_salt(body),
        tier_lookup_ok=not has_media(body),
    )


def token_info(
    model: str, token_ids: Sequence[int], chunk_tokens: int, body: dict | None = None
) -> PromptInfo:
    """Keys of a tokenized prompt; ``body`` (the request) adds its identity (:func:`input_scope`)."""
    ids = token_ids if isinstance(token_ids, array) else array("i", token_ids)
    scope = input_scope(body) if body else ""
    return PromptInfo(
        keys=token_keys(model_seed(model, scope), ids, chunk_tokens),
        n_tokens=len(ids),
        tokens_per_key=chunk_tokens,
        exact=True,
        token_ids=ids,
        salt=_salt(body),
        tier_lookup_ok=not (body and has_media(body)),
    )
