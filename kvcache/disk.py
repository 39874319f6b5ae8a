"""DiskTier: chunks as files on local disk, bounded bytes, LRU, crash-safe writes, verified reads.

Each chunk is one file ``<root>/v1/<2 hex>/<key hex>.kv`` holding a :mod:`kvcache.record` header and the payload.
Writes go to ``<root>/v1/tmp/`` first, are fsynced, then renamed into place (atomic), so a crash (even kill -9)
leaves either the whole old state or the whole new file, plus stray temp files that the next start deletes.
Every read verifies the header (magic, version, key, fingerprint, length) and the payload checksum; a bad file is
deleted and counted (``corrupt``), never served. On start the index is rebuilt from the files' headers.

Blocking: every method does file I/O and blocks; call it from a thread (``asyncio.to_thread``), never from an
event loop. Thread-safe (a lock guards the index; file I/O runs outside it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pdmesh.kvcache.record import HEADER_BYTES, CorruptRecord, FingerprintMismatch, RecordHeader

log = logging.getLogger("pdmesh.tier.disk")

_LAYOUT = "v1"


@dataclass(frozen=True)
class DiskStats:
    files: int
    used_bytes: int
    max_bytes: int
    hits: int
    misses: int
    writes: int
    evictions: int
    corrupt: int
    disk_full: int = 0  # writes that met ENOSPC/EDQUOT (the tier evicted to make room and went on)


class DiskTier:
    def __init__(self, root: str | os.PathLike, max_bytes: int, *, fsync: bool = True) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.root = Path(root).expanduser() / _LAYOUT
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, oldest first
        self._used = 0
        self._hits = self._misses = self._writes = self._evictions = self._corrupt = self._disk_full = 0
        self._rebuild()

    # ------------------------------------------------------------------ paths and index
    def _path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / f"{h}.kv"

    def _rebuild(self) -> None:
        for stray in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                stray.unlink()
        found: list[tuple[float, bytes, int]] = []
        for sub in self.root.iterdir():
            if sub.name == "tmp" or not sub.is_dir():
                continue
            for f in sub.glob("*.kv"):
                try:
                    key = bytes.fromhex(f.stem)
                    st = f.stat()
                    with open(f, "rb", buffering=0) as fh:
                        hdr = RecordHeader.unpack(fh.read(HEADER_BYTES), key=key)
                    if st.st_size != HEADER_BYTES + hdr.length:
                        raise CorruptRecord("file size does not match header")
                except (ValueError, OSError, CorruptRecord):
                    self._corrupt += 1
                    with contextlib.suppress(OSError):
                        f.unlink()
                    continue
                found.append((st.st_mtime, key, st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self._used += size
        self._evict_locked()

    def _evict_locked(self) -> list[bytes]:
        victims = []
        while self._used > self.max_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self._used -= size
            self._evictions += 1
            victims.append(key)
        return victims

    def _unlink(self, keys: Sequence[bytes]) -> None:
        for k in keys:
            with contextlib.suppress(OSError):
                self._path(k).unlink()

    def _forget(self, key: bytes, corrupt: bool) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size
            if corrupt:
                self._corrupt += 1
        self._unlink([key])

    # ------------------------------------------------------------------ API
    def contains(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys present in the index (no file I/O)."""
        n = 0
        with self._lock:
            for k in keys:
                if k not in self._index:
                    break
                n += 1
        return n

    def put(self, key: bytes, data, fingerprint: bytes | None = None) -> bool:
        """Write a chunk (temp + fsync + rename). False if already present or larger than the tier."""
        payload = memoryview(data).cast("B")
        size = HEADER_BYTES + len(payload)
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return False
        if size > self.max_bytes:
            return False
        header = RecordHeader.for_payload(key, payload, fingerprint or b"").pack()
        final = self._path(key)
        tmp = self._tmp / f"{key.hex()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        for attempt in (0, 1):
            try:
                final.parent.mkdir(exist_ok=True)
                self._write_tmp(tmp, header, payload)
                break
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self._make_room(size, e)
                if attempt:
                    return False
        os.replace(tmp, final)
        with self._lock:
            if key not in self._index:
                self._index[key] = size
                self._used += size
            self._writes += 1
            victims = self._evict_locked()
        self._unlink(victims)
        return True

    def _write_tmp(self, tmp: Path, header: bytes, payload: memoryview) -> None:
        """Write (and fsync) a temp file; removed again on any error."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            bufs = [memoryview(header), payload]
            while bufs:
                n = os.writev(fd, bufs)
                while bufs and n >= len(bufs[0]):
                    n -= len(bufs[0])
                    bufs.pop(0)
                if bufs and n:
                    bufs[0] = bufs[0][n:]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)

    def _make_room(self, need: int, err: OSError) -> None:
        """The filesystem is fuller than ``max_bytes`` assumed (other users, a small volume): count, say so once,
        and evict the least recently used chunks (at least ``2 * need`` bytes, or a tenth of what is held)."""
        with self._lock:
            self._disk_full += 1
            first = self._disk_full == 1
            goal = max(2 * need, self._used // 10)
            victims, freed = [], 0
            while freed < goal and self._index:
                key, size = self._index.popitem(last=False)
                self._used -= size
                self._evictions += 1
                freed += size
                victims.append(key)
        if first or self._disk_full % 1000 == 0:
            log.warning(
                "disk tier %s is full (%s; %d times so far): evicting %d chunks to make room",
                self.root,
                err.strerror,
                self._disk_full,
                len(victims),
            )
        self._unlink(victims)

    def get_into(self, key: bytes, out, fingerprint: bytes | None = None) -> int | None:
        """Read a verified chunk into ``out`` (writable buffer, at least the chunk's length); returns the length,
        or None on a miss. A corrupt file is deleted and counted; a chunk stored under another ``fingerprint`` is
        a miss (kept). ValueError if ``out`` is too small."""
        with self._lock:
            if key not in self._index:
                self._misses += 1
                return None
            self._index.move_to_end(key)
        dst = memoryview(out).cast("B")
        try:
            with open(self._path(key), "rb", buffering=0) as fh:
                hdr = RecordHeader.unpack(fh.read(HEADER_BYTES), key=key, fingerprint=fingerprint)
                if hdr.length > len(dst):
                    raise ValueError(f"chunk is {hdr.length} bytes, buffer only {len(dst)}")
                got = 0
                while got < hdr.length:
                    n = fh.readinto(dst[got : hdr.length])
                    if not n:
                        raise CorruptRecord("truncated payload")
                    got += n
                if fh.read(1):
                    raise CorruptRecord("trailing bytes")
            hdr.verify_payload(dst[: hdr.length])
        except FingerprintMismatch:
            with self._lock:
                self._misses += 1
            return None
        except FileNotFoundError:
            self._forget(key, corrupt=False)
            with self._lock:
                self._misses += 1
            return None
        except CorruptRecord:
            self._forget(key, corrupt=True)
            with self._lock:
                self._misses += 1
            return None
        with self._lock:
            self._hits += 1
        return hdr.length

    def get(self, key: bytes, fingerprint: bytes | None = None) -> bytes | None:
        """A verified copy of a chunk, or None."""
        with self._lock:
            size = self._index.get(key)
        if size is None:
            return self.get_into(key, bytearray(0), fingerprint)  # counts the miss
        buf = bytearray(max(0, size - HEADER_BYTES))
        n = self.get_into(key, buf, fingerprint)
        return None if n is None else bytes(buf[:n])

    def remove(self, key: bytes) -> bool:
        with self._lock:
            present = key in self._index
        if present:
            self._forget(key, corrupt=False)
        return present

    def clear(self) -> int:
        with self._lock:
            keys = list(self._index)
            self._index.clear()
            self._used = 0
        self._unlink(keys)
        return len(keys)

    def stats(self) -> DiskStats:
        with self._lock:
            return DiskStats(
                files=len(self._index),
                used_bytes=self._used,
                max_bytes=self.max_bytes,
                hits=self._hits,
                misses=self._misses,
                writes=self._writes,
                evictions=self._evictions,
                corrupt=self._corrupt,
                disk_full=self._disk_full,
            )
