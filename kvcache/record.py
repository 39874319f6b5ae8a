"""The chunk record header shared by the disk tier and the Redis tier (and the cache server's checksums).

Layout (64 bytes, little-endian): magic ``b"PDKV"``, version u16, flags u16, key 16s, fingerprint 16s,
payload length u64, checksum u64 (xxh3-64 of the payload), header checksum u64 (xxh3-64 of the previous 56 bytes).
A record is the header followed by ``length`` payload bytes. Readers verify everything; any mismatch is
:class:`CorruptRecord` and the record is never served.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from pdmesh.kvcache.errors import KVCacheError

MAGIC = b"PDKV"
RECORD_VERSION = 1
NO_FINGERPRINT = b"\0" * 16
_HEAD = struct.Struct("<4sHH16s16sQQ")
_FULL = struct.Struct("<4sHH16s16sQQQ")
HEADER_BYTES = _FULL.size  # 64


class CorruptRecord(KVCacheError):
    """A record failed verification (bad magic/version/key/length/checksum)."""


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
