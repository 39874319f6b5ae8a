"""Chunk keys: a chained, stable, cryptographic-strength hash over full token chunks, seeded by a model fingerprint.

key(-1) = ``fingerprint.digest()``; key(i) = blake2b-128(key(i-1) || tokens of chunk i as little-endian uint32).
Only full chunks get a key. The result depends only on the fingerprint fields and the token ids, so any two
processes on any machine agree (never Python's ``hash()``, which is salted per process). Keys are 16-byte ``bytes``;
JSON carries them as lowercase hex.

Input identity: besides the token ids, a chunk's KV depends on the LoRA adapter, a tenant's ``cache_salt`` and
multimodal inputs (image placeholders are the same token ids for different images). :class:`InputIdentity` carries
them: the adapter and salt re-seed the whole chain (:meth:`InputIdentity.seed`), and each chunk that overlaps a
multimodal input's placeholder range also hashes that input's content identifier and offset
(:meth:`InputIdentity.chunk_extra`), as vLLM's own block hash does. A request without any of them keys exactly as
before (``InputIdentity()`` changes nothing).

Shards: an engine split over tensor-parallel ranks (and pipeline stages) holds each chunk's KV in
``fingerprint.shards`` worker processes, each a different part (its KV heads, its layers). Each part is stored
under its own key, :func:`shard_key` (``blake2b-128(key || shard as little-endian uint16)``); an engine of one shard
stores under the chunk key itself. A chunk is there for such an engine when all its shards are
(:func:`every_shard_keys`, one lookup).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass

#: Version of the chunk byte format and key derivation. Bump it when either changes: all old keys then miss.
FORMAT_VERSION = 1
KEY_BYTES = 16
_PERSON_FP = b"pdmesh-fp"
_PERSON_CHUNK = b"pdmesh-chunk"
_PERSON_SHARD = b"pdmesh-shard"
_PERSON_IDENTITY = b"pdmesh-ident"
_MEDIA_TAG = b"\xffmedia"
_MAX_TOKEN = 2**32


@dataclass(frozen=True)
class ModelFingerprint:
    """Everything that changes the bytes of a KV chunk. Two engines share cached KV only if all fields agree."""

    model: str
    revision: str = ""
    dtype: str = "float32"
    layout: str = ""
    block_size: int = 16
    tp_rank: int = 0  # always 0 in keys: each rank's part is told apart by shard_key, not by the seed
    tp_size: int = 1
    format_version: int = FORMAT_VERSION
    pp_size: int = 1  # pipeline stages; left out of the digest when 1 (keys of unstaged engines never change)

    @property
    def shards(self) -> int:
        """Worker processes that each hold a different part of every chunk (tensor ranks x pipeline stages).
        ValueError unless both sizes are positive integers (a fingerprint may come from a request body)."""
        for name in ("tp_size", "pp_size"):
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        return self.tp_size * self.pp_size

    def digest(self) -> bytes:
        """16 bytes: blake2b over the canonical JSON of the fields (sorted keys, no whitespace)."""
        fields = asdict(self)
        if fields["pp_size"] == 1:
            del fields["pp_size"]
        canon = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(canon, digest_size=KEY_BYTES, person=_PERSON_FP).digest()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelFingerprint:
        return cls(**d)


@dataclass(frozen=True)
class MediaInput:
    """One multimodal input of a prompt: its placeholder tokens ``[offset, offset + length)`` and the content
    identifier the engine hashed it to (vLLM's ``mm_hash``)."""

    offset: int
    length: int
    identifier: str


@dataclass(frozen=True)
class InputIdentity:
    """What changes a request's KV besides its token ids and the engine fingerprint.

    ``adapter``: the LoRA adapter's identity (name and a digest of its weights, ``""`` for the base model);
    ``salt``: the request's ``cache_salt`` (tenant isolation, ``""`` for none); ``media``: the multimodal inputs,
    sorted by offset. Equal identities and equal tokens give equal keys on any process; any difference in one of
    the fields gives different keys from the first chunk (adapter, salt) or from the first chunk that overlaps a
    differing input (media) on.
    """

    adapter: str = ""
    salt: str = ""
    media: tuple[MediaInput, ...] = ()

    @property
    def plain(self) -> bool:
        """True for a request keyed by tokens alone (the base model, no salt, no multimodal inputs)."""
        return not (self.adapter or self.salt or self.media)

    def seed(self, base: bytes) -> bytes:
        """The chain's seed for this identity: ``base`` (a fingerprint digest) itself without adapter or salt,
        else blake2b over ``base`` and the canonical JSON of both."""
        if not (self.adapter or self.salt):
            return base
        h = hashlib.blake2b(base, digest_size=KEY_BYTES, person=_PERSON_IDENTITY)
        h.update(json.dumps([self.adapter, self.salt], separators=(",", ":")).encode())
        return h.digest()

    def chunk_extra(self, start: int, end: int) -> bytes:
        """What chunk ``[start, end)`` hashes besides its tokens: each overlapping input's identifier and its
        offset relative to the chunk (the same input at another place is other KV). Empty when none overlaps."""
        out = bytearray()
        for m in self.media:
            if m.offset < end and m.offset + m.length > start:
                ident = m.identifier.encode()
                out += (
                    len(ident).to_bytes(4, "little")
                    + ident
                    + (m.offset - start).to_bytes(8, "little", signed=True)
                )
        return bytes(out)


def _chunk_bytes(chunk: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(chunk)}I", *chunk)
    except struct.error as e:
        bad = next((t for t in chunk if not (0 <= int(t) < _MAX_TOKEN)), None)
        raise ValueError(f"token id {bad!r} is not a uint32") from e


def chain_keys(
    seed: bytes, token_ids: Sequence[int], chunk_tokens: int, identity: InputIdentity | None = None
) -> list[bytes]:
    """Keys of the full chunks of ``token_ids`` chained from ``seed`` (a fingerprint digest), under ``identity``
    (none: tokens alone)."""
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    if len(seed) != KEY_BYTES:
        raise ValueError(f"seed must be {KEY_BYTES} bytes")
    keys: list[bytes] = []
    prev = seed if identity is None else identity.seed(seed)
    media = identity is not None and bool(identity.media)
    for start in range(0, len(token_ids) - chunk_tokens + 1, chunk_tokens):
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES, person=_PERSON_CHUNK)
        h.update(_chunk_bytes(token_ids[start : start + chunk_tokens]))
        if media:  # token bytes are a fixed length per chunk: what follows cannot be confused with tokens
            extra = identity.chunk_extra(start, start + chunk_tokens)  # type: ignore[union-attr]
            if extra:
                h.update(_MEDIA_TAG + len(extra).to_bytes(4, "little") + extra)
        prev = h.digest()
        keys.append(prev)
    return keys


def chunk_keys(
    fingerprint: ModelFingerprint,
    token_ids: Sequence[int],
    chunk_tokens: int,
    identity: InputIdentity | None = None,
) -> list[bytes]:
    """Keys of the full chunks of ``token_ids`` (``len(token_ids) // chunk_tokens`` keys) under ``identity``.
    Pure, deterministic."""
    return chain_keys(fingerprint.digest(), token_ids, chunk_tokens, identity)


def shard_key(key: bytes, shard: int) -> bytes:
    """The key worker process ``shard`` (``pp_rank * tp_size + tp_rank``) of a sharded engine stores its part of
    chunk ``key`` under. Distinct per shard and from every chunk key."""
    if not 0 <= shard < 1 << 16:
        raise ValueError(f"shard {shard} out of range")
    h = hashlib.blake2b(key, digest_size=KEY_BYTES, person=_PERSON_SHARD)
    h.update(shard.to_bytes(2, "little"))
    return h.digest()


def shard_keys(keys: Sequence[bytes], shard: int, shards: int) -> list[bytes]:
    """``keys`` as worker process ``shard`` of an engine of ``shards`` stores them: the keys themselves when the
    engine has one shard."""
    if shards <= 1:
        return list(keys)
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}")
    return [shard_key(k, shard) for k in keys]


def every_shard_keys(keys: Sequence[bytes], shards: int) -> list[bytes]:
    """Every shard's key of every chunk, chunk by chunk (``shards`` per chunk, shard order): the leading run of
    them a tier holds, divided by ``shards``, is how many leading chunks are whole there."""
    if shards <= 1:
        return list(keys)
    return [shard_key(k, s) for k in keys for s in range(shards)]


def key_hex(key: bytes) -> str:
    return key.hex()


def key_from_hex(text: str) -> bytes:
    """Parse a hex key; ValueError unless it is exactly 16 bytes."""
    key = bytes.fromhex(text)
    if len(key) != KEY_BYTES:
        raise ValueError(f"a key is {KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits), got {len(key)}")
    return key
