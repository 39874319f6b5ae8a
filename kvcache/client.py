"""TierClient: the synchronous client of a tier server's control socket (used by the vLLM connector's threads).

Every call has a timeout (``timeout_s``). When the server is down, restarting, or too slow, a call raises
:class:`TierUnavailable` (the connection is dropped and re-made on the next call) so the caller can fall back to
computing the KV. A typed error reply raises :class:`TierError` with its ``kind``. Thread-safe: one connection,
one request at a time (a lock).

Data moves through shared memory: :meth:`segment` maps the pool segment the server named in ``hello``;
``alloc`` / ``load`` return ``(offset, length)`` pairs into it. Who frees what: every ``load`` must be followed by
``release`` of the same keys, every ``pin`` by ``unpin``, every ``alloc`` by ``commit`` or ``abort``; if the
client's connection closes first, the server undoes all of them (leased allocations expire instead).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pdmesh.frames import FrameError, recv_frame, send_frame
from pdmesh.kvcache.control_ops import CONTROL_PROTO
from pdmesh.kvcache.errors import KVCacheError
from pdmesh.kvcache.pool import Allocation
from pdmesh.transfer.segment import attach_segment


class TierUnavailable(KVCacheError):
    """The tier server cannot be reached or did not answer in time. Fall back to computing."""


class TierError(KVCacheError):
    """The tier server answered with an error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class LookupResult:
    n: int  # leading chunks held by some tier
    tiers: list[str]  # per held chunk: "memory" | "disk" | "remote"


@dataclass(frozen=True)
class AllocResult:
    locs: list[Allocation | None]  # None: the key is already present (skip it)
    full: bool  # the pool ran out; locs stops at the first key that did not fit


_RETRY_SAFE = frozenset({"lookup", "stats"})  # ops that name no pool offset: safe on a restarted server


class TierClient:
    def __init__(
        self,
        socket_path: str,
        token: str = "",
        *,
        timeout_s: float = 2.0,
        fingerprint: dict | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        """``fingerprint`` and ``chunk_tokens`` (the engine's) are told to the server at hello."""
        self.socket_path = socket_path
        self.token = token
        self.timeout_s = timeout_s
        self.fingerprint = fingerprint
        self.chunk_tokens = chunk_tokens
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.info: dict[str, Any] = {}
        self._mmap = None
        self._view: memoryview | None = None

    # ------------------------------------------------------------------ transport
    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        try:
            s.connect(self.socket_path)
            msg = {"id": 0, "op": "hello", "proto": CONTROL_PROTO, "token": self.token}
            if self.fingerprint:
                msg["fingerprint"] = self.fingerprint
            if self.chunk_tokens:
                msg["chunk_tokens"] = self.chunk_tokens
            send_frame(s, msg)
            reply = recv_frame(s)
        except (OSError, FrameError) as e:
            s.close()
            raise TierUnavailable(f"tier server at {self.socket_path}: {e}") from e
        if not reply.get("ok"):
            s.close()
            raise TierError(reply.get("error", "error"), reply.get("message", ""))
        self.info = reply
        return s

    def call(self, op: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and wait (at most ``timeout_s``) for its reply.

        A ``lookup`` or ``stats`` that fails on a connection opened by an earlier call (the server restarted
        since: a broken pipe, a reset, EOF) is sent once more on a fresh connection, so a restarted tier answers
        its first lookup. Other ops are not retried: their offsets refer to the segment of the server the caller
        last saw, and a restarted server has a new one (the caller must re-map it: ``TierUnavailable`` tells it
        so). A timeout is never retried (a hung server would cost twice). Raises TierUnavailable."""
        with self._lock:
            for attempt in (0, 1):
                fresh = self._sock is None
                if fresh:
                    self._sock = self._connect()
                s = self._sock
                rid = next(self._ids)
                try:
                    s.settimeout(timeout_s or self.timeout_s)
                    send_frame(s, {"id": rid, "op": op, **fields})
                    reply = recv_frame(s)
                    if reply.get("id") != rid:
                        raise FrameError(f"reply id {reply.get('id')} != request id {rid}")
                    break
                except (OSError, FrameError) as e:
                    self._drop()
                    if fresh or attempt or isinstance(e, TimeoutError) or op not in _RETRY_SAFE:
                        raise TierUnavailable(f"tier server {op}: {e}") from e
        if not reply.get("ok"):
            raise TierError(reply.get("error", "error"), reply.get("message", ""))
        return reply

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def connect(self) -> dict[str, Any]:
        """Connect now (else the first call does); returns the server's hello reply."""
        with self._lock:
            if self._sock is None:
                self._sock = self._connect()
        return self.info

    def close(self) -> None:
        with self._lock:
            self._drop()
            if self._view is not None:
                self._view.release()
                self._view = None
            if self._mmap is not None:
                with contextlib.suppress(BufferError):
                    self._mmap.close()
                self._mmap = None

    def __enter__(self) -> TierClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ shared memory
    def segment(self) -> memoryview:
        """The pool segment, mapped read/write (cached; unmapped by :meth:`close`)."""
        if self._view is None:
            self.connect()
            try:
                self._mmap = attach_segment(self.info["segment"])
            except OSError as e:
                raise TierUnavailable(f"cannot map segment {self.info.get('segment')}: {e}") from e
            self._view = memoryview(self._mmap)
        return self._view

    # ------------------------------------------------------------------ operations
    def lookup(self, keys: Sequence[bytes], remote: bool = True) -> LookupResult:
        r = self.call("lookup", keys=list(keys), remote=remote)
        return LookupResult(r["n"], r["tiers"])

    def load(self, keys: Sequence[bytes]) -> list[Allocation]:
        """Bring the longest available prefix into the pool; the caller must :meth:`release` those keys."""
        r = self.call("load", keys=list(keys))
        return [Allocation(o, n) for o, n in r["locs"]]

    def alloc(
        self, keys: Sequence[bytes], nbytes: int | Sequence[int], lease_s: float | None = None
    ) -> AllocResult:
        sizes = nbytes if isinstance(nbytes, int) else list(nbytes)
        r = self.call("alloc", keys=list(keys), nbytes=sizes, lease_s=lease_s)
        return AllocResult([None if x is None else Allocation(x[0], x[1]) for x in r["locs"]], r["full"])

    def commit(self, keys: Sequence[bytes]) -> int:
        return self.call("commit", keys=list(keys))["n"]

    def abort(self, keys: Sequence[bytes]) -> int:
        return self.call("abort", keys=list(keys))["n"]

    def pin(self, keys: Sequence[bytes]) -> int:
        return self.call("pin", keys=list(keys))["n"]

    def unpin(self, keys: Sequence[bytes]) -> int:
        return self.call("unpin", keys=list(keys))["n"]

    def release(self, keys: Sequence[bytes]) -> int:
        return self.call("release", keys=list(keys))["n"]

    def stats(self) -> dict[str, Any]:
        return self.call("stats")["stats"]

    def clear(self, tiers: Sequence[str] = ("memory",)) -> dict[str, int]:
        return self.call("clear", tiers=list(tiers))["cleared"]

    # ------------------------------------------------------------------ conveniences (copy through shm)
    def put(self, keys: Sequence[bytes], chunks: Sequence[bytes | memoryview]) -> int:
        """Store chunks (alloc, copy into the segment, commit). Returns how many were newly stored."""
        seg = self.segment()
        r = self.alloc(keys, [len(c) for c in chunks])
        written = []
        for key, loc, data in zip(keys, r.locs, chunks, strict=False):
            if loc is not None:
                seg[loc.offset : loc.offset + loc.length] = data
                written.append(key)
        return self.commit(written) if written else 0

    def get(self, keys: Sequence[bytes]) -> list[bytes]:
        """Copies of the longest available prefix of ``keys`` (load, copy, release)."""
        locs = self.load(keys)
        seg = self.segment()
        try:
            return [bytes(seg[a.offset : a.offset + a.length]) for a in locs]
        finally:
            if locs:
                self.release(keys[: len(locs)])
