"""Chunk records: the checksummed record of the disk tier and the authenticated record of the remote tiers.

A record is a 64-byte little-endian header followed by ``length`` payload bytes. Readers verify everything; any
mismatch raises and the record is never served.

* Version 1, :class:`RecordHeader` (disk tier): magic ``b"PDKV"``, version u16, flags u16, key 16s,
  fingerprint 16s, payload length u64, checksum u64 (xxh3-64 of the payload), header checksum u64 (xxh3-64 of
  the previous 56 bytes). It catches corruption, not forgery: only this node writes its disk.
* Version 2, :class:`RecordMac` (Redis values; the cache server stores the same tag beside each item): magic,
  version u16 = 2, flags u16 = 0, key 16s, fingerprint 16s, payload length u64, then a 16-byte tag over the
  first 48 header bytes and the payload. With a cluster token the tag is HMAC-SHA256 (truncated to 128 bits) keyed
  by ``auth_proof(token, "tier-record-mac")``, so whoever can write to the remote but lacks the token cannot plant
  or alter a record that a reader accepts. Without a token (single-user loopback runs) the tag is an unkeyed
  xxh3-128 digest: it then only catches corruption, since anyone can compute it.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

import xxhash

from pdmesh.kvcache.errors import KVCacheError
from pdmesh.security import auth_proof

MAGIC = b"PDKV"
RECORD_VERSION = 1
NO_FINGERPRINT = b"\0" * 16
_HEAD = struct.Struct("<4sHH16s16sQQ")
_FULL = struct.Struct("<4sHH16s16sQQQ")
HEADER_BYTES = _FULL.size  # 64


class CorruptRecord(KVCacheError):
    """A record failed verification (bad magic/version/key/length/checksum)."""


class UnauthenticRecord(CorruptRecord):
    """A record whose tag does not verify: planted or altered by a writer without this cluster's token, written
    under another token (or without one), damaged, or of a record version that carries no tag (version 1)."""


class FingerprintMismatch(KVCacheError):
    """A valid record stored under another model fingerprint: a miss for this caller, not corruption."""


def checksum(data) -> int:
    """xxh3-64 of a bytes-like object (no copy)."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class RecordHeader:
    key: bytes
    fingerprint: bytes
    length: int
    checksum: int

    def pack(self) -> bytes:
        head = _HEAD.pack(MAGIC, RECORD_VERSION, 0, self.key, self.fingerprint, self.length, self.checksum)
        return head + struct.pack("<Q", checksum(head))

    @classmethod
    def for_payload(cls, key: bytes, data, fingerprint: bytes = NO_FINGERPRINT) -> RecordHeader:
        return cls(key, fingerprint or NO_FINGERPRINT, len(memoryview(data).cast("B")), checksum(data))

    @classmethod
    def unpack(cls, raw, key: bytes | None = None, fingerprint: bytes | None = None) -> RecordHeader:
        """Parse and verify a header. ``key``/``fingerprint``, when given, must match."""
        if len(raw) < HEADER_BYTES:
            raise CorruptRecord("short header")
        magic, ver, _flags, k, fp, length, csum, hsum = _FULL.unpack_from(raw)
        if magic != MAGIC:
            raise CorruptRecord("bad magic")
        if ver != RECORD_VERSION:
            raise CorruptRecord(f"unsupported record version {ver}")
        if checksum(memoryview(raw)[: _HEAD.size]) != hsum:
            raise CorruptRecord("header checksum mismatch")
        if key is not None and k != key:
            raise CorruptRecord("key mismatch")
        if fingerprint is not None and fp != fingerprint:
            raise FingerprintMismatch("fingerprint mismatch")
        return cls(k, fp, length, csum)

    def verify_payload(self, data) -> None:
        if len(data) != self.length:
            raise CorruptRecord(f"payload is {len(data)} bytes, header says {self.length}")
        if checksum(data) != self.checksum:
            raise CorruptRecord("payload checksum mismatch")


MAC_RECORD_VERSION = 2
MAC_BYTES = 16
MAC_LABEL = "tier-record-mac"  # auth_proof label of the record MAC key: no other use of the token shares it
_MAC_HEAD = struct.Struct("<4sHH16s16sQ")  # the authenticated header fields (48 bytes)
_MAC_FULL = struct.Struct("<4sHH16s16sQ16s")
assert _MAC_FULL.size == HEADER_BYTES


class RecordMac:
    """Tags and verifies remote-tier records for one cluster token (thread-safe: it holds only the key).

    ``keyed`` is True with a token: tags are HMAC-SHA256/128 under a key derived from it with its own label
    (:data:`MAC_LABEL`). With ``token=""`` tags are unkeyed xxh3-128 digests and only catch corruption.
    A tag binds the record version, key, fingerprint, length and payload: a valid record moved to another key,
    relabelled with another fingerprint, truncated or altered no longer verifies."""

    def __init__(self, token: str = "") -> None:
        self.keyed = bool(token)
        self._key = auth_proof(token, MAC_LABEL) if token else b""

    def tag(self, key: bytes, fingerprint: bytes | None, data) -> bytes:
        """The :data:`MAC_BYTES`-byte tag of a payload stored under ``key`` and ``fingerprint``."""
        view = memoryview(data).cast("B")
        head = _MAC_HEAD.pack(MAGIC, MAC_RECORD_VERSION, 0, key, fingerprint or NO_FINGERPRINT, len(view))
        return self._tag(head, view)

    def _tag(self, head, payload) -> bytes:
        if self.keyed:
            mac = hmac.new(self._key, head, "sha256")
            mac.update(payload)
            return mac.digest()[:MAC_BYTES]
        h = xxhash.xxh3_128(head)
        h.update(payload)
        return h.digest()

    def verify(self, tag: object, key: bytes, fingerprint: bytes | None, data) -> bool:
        """True when ``tag`` is this token's tag of ``data`` under ``key``/``fingerprint`` (constant-time compare;
        False for anything that is not :data:`MAC_BYTES` bytes)."""
        if not isinstance(tag, bytes) or len(tag) != MAC_BYTES:
            return False
        if fingerprint is not None and (not isinstance(fingerprint, bytes) or len(fingerprint) != 16):
            return False
        return hmac.compare_digest(tag, self.tag(key, fingerprint, data))

    def seal(self, key: bytes, data, fingerprint: bytes | None = None) -> bytes:
        """The version-2 header of a record holding ``data``: store it followed by the payload."""
        view = memoryview(data).cast("B")
        fp = fingerprint or NO_FINGERPRINT
        head = _MAC_HEAD.pack(MAGIC, MAC_RECORD_VERSION, 0, key, fp, len(view))
        return head + self._tag(head, view)

    def open(self, raw, key: bytes, fingerprint: bytes | None = None) -> memoryview:
        """The verified payload of record ``raw`` (a view into it) read under ``key``.

        Raises :class:`CorruptRecord` for a malformed record (short, bad magic, length mismatch),
        :class:`UnauthenticRecord` when it is not this token's record for ``key`` (another version, another key,
        a tag that does not verify), and :class:`FingerprintMismatch` for a genuine record of another
        ``fingerprint`` (checked after the tag, so a forged fingerprint counts as unauthentic, not as a miss)."""
        view = memoryview(raw).cast("B")
        if len(view) < HEADER_BYTES:
            raise CorruptRecord("short record")
        magic, ver, _flags, k, fp, length, tag = _MAC_FULL.unpack_from(view)
        if magic != MAGIC:
            raise CorruptRecord("bad magic")
        if ver != MAC_RECORD_VERSION:
            raise UnauthenticRecord(f"record version {ver} carries no tag (want {MAC_RECORD_VERSION})")
        payload = view[HEADER_BYTES:]
        if length != len(payload):
            raise CorruptRecord(f"payload is {len(payload)} bytes, header says {length}")
        if k != key:
            raise UnauthenticRecord("record of another key")
        if not hmac.compare_digest(tag, self._tag(view[: _MAC_HEAD.size], payload)):
            raise UnauthenticRecord("record tag does not verify")
        if fingerprint is not None and fp != fingerprint:
            raise FingerprintMismatch("fingerprint mismatch")
        return payload
