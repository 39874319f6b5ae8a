"""A request's input identity (what besides its tokens changes its KV), read from vLLM's request object.

:func:`identity_of` answers an :class:`pdmesh.kvcache.keys.InputIdentity` for requests whose KV can be keyed, or a
skip reason for those that cannot: such requests neither load nor save nor wait for pushed chunks (counted by
reason in the scheduler's stats), so they are never served KV computed for other inputs.

- LoRA: the adapter's name and a digest of its files (:func:`adapter_digest`), so that two workers that mount the
  same adapter at different paths share its KV, and a name re-pointed at other weights does not. An adapter
  whose weight files cannot be read here is a skip (``adapter_unreadable``).
- ``cache_salt``: the salt itself.
- multimodal inputs: each input's placeholder range and content identifier (vLLM's ``mm_hash``); an input
  without an identifier is a skip (``multimodal_unhashed``).
- prompt embeddings: a skip (``prompt_embeds``): their KV depends on tensors the tokens do not name.

Never raises: a request object of an unexpected shape is a skip (``unreadable``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

from pdmesh.kvcache.keys import InputIdentity, MediaInput

# Files of an adapter directory hashed into its identity (PEFT's layout); other files are ignored.
_ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "adapter_model.pt",
    "new_embeddings.safetensors",
    "new_embeddings.bin",
)
_MAX_ADAPTER_BYTES = 4 << 30  # an adapter directory larger than this is keyed by name and path only

_digests: dict[tuple, str] = {}
_digests_lock = threading.Lock()


def adapter_digest(path: str) -> str:
    """A hex digest of an adapter directory's weight and config files, cached per (path, sizes, mtimes): the
    first call for an adapter reads its files once (blocking; tens of ms for a typical adapter). ``""`` when the
    path is not a readable adapter directory."""
    try:
        stats = []
        for name in _ADAPTER_FILES:
            full = os.path.join(path, name)
            if os.path.isfile(full):
                st = os.stat(full)
                stats.append((name, st.st_size, st.st_mtime_ns))
    except OSError:
        return ""
    if not stats or sum(s[1] for s in stats) > _MAX_ADAPTER_BYTES:
        return ""
    cache_key = (path, tuple(stats))
    with _digests_lock:
        hit = _digests.get(cache_key)
    if hit is not None:
        return hit
    h = hashlib.blake2b(digest_size=16, person=b"pdmesh-adapter")
    try:
        for name, size, _ in stats:
            h.update(f"{name}:{size}\0".encode())
            with open(os.path.join(path, name), "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    except OSError:
        return ""
    digest = h.hexdigest()
    with _digests_lock:
        _digests[cache_key] = digest
    return digest


def _adapter_identity(lora_request: Any) -> str:
    """``""`` when the adapter's weights cannot be read here (then the request is not keyed)."""
    name = str(getattr(lora_request, "lora_name", "") or "")
    path = str(getattr(lora_request, "lora_path", "") or "")
    digest = adapter_digest(path) if path else ""
    return f"lora:{name}:sha:{digest}" if digest else ""


def _media(request: Any) -> tuple[MediaInput, ...] | None:
    """The request's multimodal inputs; None when one has no content identifier."""
    out = []
    for feature in getattr(request, "mm_features", None) or ():
        ident = getattr(feature, "identifier", None)
        pos = getattr(feature, "mm_position", None)
        if not ident or pos is None:
            return None
        out.append(MediaInput(int(pos.offset), int(pos.length), str(ident)))
    return tuple(sorted(out, key=lambda m: (m.offset, m.length, m.identifier)))


def identity_of(request: Any) -> InputIdentity | str:
    """The request's identity, or the reason it cannot be keyed (a skip: no load, save, push or wait)."""
    try:
        if getattr(request, "prompt_embeds", None) is not None:
            return "prompt_embeds"
        media = _media(request)
        if media is None:
            return "multimodal_unhashed"
        lora = getattr(request, "lora_request", None)
        adapter = _adapter_identity(lora) if lora else ""
        if lora and not adapter:
            return "adapter_unreadable"
        salt = getattr(request, "cache_salt", None) or ""
        return InputIdentity(adapter=adapter, salt=str(salt), media=media)
    except Exception:  # untrusted shape: never raise inside vLLM's scheduler
        return "unreadable"
