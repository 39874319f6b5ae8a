"""Client of the pdmesh cache server (``pdmesh://host:port``), a :class:`pdmesh.kvcache.remote.RemoteTier`.

All calls block (network I/O): call them from a thread, never an event loop. Every socket operation is bounded
(``connect_timeout_s``, ``timeout_s``). Each put carries the chunk's record tag
(:class:`pdmesh.kvcache.record.RecordMac`, keyed from the cluster token) and the server hands it back with the
chunk; the client verifies it on every get, so neither the server nor another writer can plant or alter a chunk
this client accepts. A chunk that fails is a miss, never an exception, and is deleted from the server (so it
cannot block the genuine put): counted in ``corrupt`` when its checksum also fails (damage), else in
``mac_failures`` (planted, altered, or written under another token).
"""

from __future__ import annotations

import contextlib
import queue
import socket
from collections.abc import Sequence

from pdmesh.frames import FrameError, recv_exact_into, recv_frame, send_frame, tune_tcp
from pdmesh.kvcache.cache_server import PROTO_VERSION
from pdmesh.kvcache.errors import RemoteError, RemoteUnavailable
from pdmesh.kvcache.record import NO_FINGERPRINT, RecordMac, checksum

_REJECTED = object()  # get_into's op: the server sent a chunk that failed verification


class CacheServerClient:
    """Client of :mod:`pdmesh.kvcache.cache_server`. Thread-safe: a small pool of connections, one per concurrent call.
    Any socket error or timeout closes that connection and raises :class:`RemoteUnavailable`. ``token`` is the
    cluster token: sent in the hello and the key of the record tags (unkeyed digests when empty)."""

    name = "cache_server"

    def __init__(
        self,
        host: str,
        port: int,
        token: str = "",
        *,
        timeout_s: float = 2.0,
        connect_timeout_s: float = 0.5,
        max_idle: int = 16,
    ) -> None:
        self.address = (host, port)
        self.token = token
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._idle: queue.LifoQueue[socket.socket] = queue.LifoQueue(max_idle)
        self.mac = RecordMac(token)
        self.corrupt = 0  # chunks whose checksum and tag both failed (damaged)
        self.mac_failures = 0  # chunks whose tag failed (planted, altered, another token)

    def _connect(self) -> socket.socket:
        try:
            s = socket.create_connection(self.address, timeout=self.connect_timeout_s)
        except OSError as e:
            raise RemoteUnavailable(f"cache server {self.address[0]}:{self.address[1]}: {e}") from e
        tune_tcp(s)
        s.settimeout(self.timeout_s)
        try:
            send_frame(s, {"op": "hello", "proto": PROTO_VERSION, "token": self.token})
            reply = recv_frame(s)
        except (OSError, FrameError) as e:
            s.close()
            raise RemoteUnavailable(f"cache server hello failed: {e}") from e
        if not reply.get("ok"):
            s.close()
            raise RemoteError(f"cache server refused: {reply.get('error')}: {reply.get('message')}")
        return s

    def _call(self, fn):
        """Run ``fn(sock)`` on a pooled connection (or a new one). When a pooled connection fails, the server may
        have restarted and every pooled connection is stale: they are all dropped and ``fn`` runs once more on a
        fresh connection, so a restarted server serves the very next call."""
        try:
            s, pooled = self._idle.get_nowait(), True
        except queue.Empty:
            s, pooled = self._connect(), False
        try:
            result = fn(s)
        except (OSError, FrameError, ValueError) as e:
            with contextlib.suppress(OSError):
                s.close()
            if isinstance(e, ValueError):
                raise
            if not pooled:
                raise RemoteUnavailable(f"cache server {self.address[0]}:{self.address[1]}: {e}") from e
            self._drop_idle()
            s = self._connect()
            try:
                result = fn(s)
            except (OSError, FrameError, ValueError) as e2:
                with contextlib.suppress(OSError):
                    s.close()
                if isinstance(e2, ValueError):
                    raise
                raise RemoteUnavailable(f"cache server {self.address[0]}:{self.address[1]}: {e2}") from e2
        try:
            self._idle.put_nowait(s)
        except queue.Full:
            s.close()
        return result

    def _drop_idle(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    @staticmethod
    def _ok(reply: dict) -> dict:
        if not reply.get("ok"):
            raise RemoteError(f"cache server error {reply.get('error')}: {reply.get('message')}")
        return reply

    def put(self, key: bytes, data, fingerprint: bytes | None = None) -> bool:
        view = memoryview(data).cast("B")
        fp = fingerprint or NO_FINGERPRINT
        msg = {
            "op": "put",
            "key": key,
            "fp": fp,
            "n": len(view),
            "csum": checksum(view),
            "mac": self.mac.tag(key, fp, view),
        }

        def op(s: socket.socket) -> bool:
            send_frame(s, msg, view)
            return bool(self._ok(recv_frame(s)).get("stored"))

        return self._call(op)

    def get_into(self, key: bytes, out, fingerprint: bytes | None = None) -> int | None:
        """Read ``key`` into ``out``; its length, or None for a miss. A chunk whose tag does not verify is a miss
        (``out`` may then hold its bytes), counted and deleted from the server. With ``fingerprint`` given, a
        genuine chunk of another fingerprint is a plain miss. ValueError when ``out`` is too small."""
        dst = memoryview(out).cast("B")

        def op(s: socket.socket):
            send_frame(s, {"op": "get", "key": key, "fp": fingerprint})
            reply = self._ok(recv_frame(s))
            if not reply.get("hit"):
                return None
            n = reply.get("n")
            if not isinstance(n, int) or n < 0:
                raise FrameError(f"cache server sent a chunk length of {n!r}")  # closes the connection
            if n > len(dst):
                raise ValueError(f"chunk is {n} bytes, buffer only {len(dst)}")  # closes the connection
            recv_exact_into(s, dst[:n])
            fp = reply.get("fp")
            if not self.mac.verify(reply.get("mac"), key, fp, dst[:n]):
                if checksum(dst[:n]) != reply.get("csum"):
                    self.corrupt += 1
                else:
                    self.mac_failures += 1
                return _REJECTED
            if fingerprint is not None and fp != fingerprint:
                return None  # a genuine chunk of another model (the server filters these already)
            return n

        n = self._call(op)
        if n is _REJECTED:
            with contextlib.suppress(RemoteError):
                self.delete([key])
            return None
        return n

    def get(self, key: bytes, fingerprint: bytes | None = None, max_bytes: int = 1 << 28) -> bytes | None:
        buf = bytearray(max_bytes)
        n = self.get_into(key, buf, fingerprint)
        return None if n is None else bytes(memoryview(buf)[:n])

    def contains(self, keys: Sequence[bytes]) -> int:
        def op(s: socket.socket) -> int:
            send_frame(s, {"op": "contains", "keys": list(keys)})
            return int(self._ok(recv_frame(s))["n"])

        return self._call(op)

    def _simple(self, msg: dict) -> dict:
        def op(s: socket.socket) -> dict:
            send_frame(s, msg)
            return self._ok(recv_frame(s))

        return self._call(op)

    def delete(self, keys: Sequence[bytes]) -> int:
        return int(self._simple({"op": "delete", "keys": list(keys)})["n"])

    def clear(self) -> int:
        return int(self._simple({"op": "clear"})["n"])

    def stats(self) -> dict:
        return self._simple({"op": "stats"})["stats"]

    def close(self) -> None:
        self._drop_idle()
