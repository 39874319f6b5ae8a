"""The pdmesh cache server: a standalone shared remote tier (the role of ``lmcache_server``).

Protocol (TCP, :mod:`pdmesh.frames` frames, one request at a time per connection, replies in order):

* ``{"op": "hello", "proto": 1, "token": str}`` must come first, within ``HELLO_TIMEOUT_S`` and in at most
  ``PRE_AUTH_MAX_FRAME`` bytes -> ``{"ok": true, "proto": 1}``; a wrong token or protocol version gets an error
  reply and the connection is closed. (The token is sent: the client only ever connects to the operator-configured
  ``remote.url``, never to an address from a request.) Malformed fields after the hello get a ``bad_request``
  reply; the connection and the server live on.
* ``{"op": "put", "key": bytes16, "fp": bytes16, "n": int, "csum": int, "mac": bytes16}`` + ``n`` payload
  bytes -> ``{"ok": true, "stored": bool}``. The server verifies the xxh3-64 checksum before storing; a mismatch
  is an error reply (``corrupt``) and nothing is stored. ``mac`` is the writer's record tag
  (:class:`pdmesh.kvcache.record.RecordMac`, keyed from the cluster token): the server stores it opaquely and
  never checks it; a put without one is a ``bad_request`` (and the connection closes).
* ``{"op": "get", "key": bytes16, "fp": bytes16 | None}`` -> ``{"ok": true, "hit": false}`` or
  ``{"ok": true, "hit": true, "n": int, "csum": int, "mac": bytes, "fp": bytes16}`` + ``n`` payload bytes. The
  client verifies ``mac``, so integrity holds end to end: a record planted or altered by a writer without the
  token, or by this server, is a miss on the client. With ``fp`` given, a chunk stored under another fingerprint
  is a miss.
* ``{"op": "contains", "keys": [bytes16]}`` -> ``{"ok": true, "n": leading present count}``
* ``{"op": "delete", "keys": [...]}``, ``{"op": "clear"}``, ``{"op": "stats"}``.
* Errors: ``{"ok": false, "error": type, "message": str}``.

Storage: an in-memory LRU bounded in bytes (payload buffers rounded up to 4 KiB pages; recycled, not freed).
Threads, not asyncio: one thread per connection doing blocking ``recv_into`` straight into the item's buffer and
``sendall`` from it, which releases the GIL and keeps loopback throughput in the GB/s range. A ``get`` sends outside
the lock under a reader reference, so a concurrent eviction cannot recycle a buffer that is being sent.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from dataclasses import asdict

import pdmesh.failpoints as failpoints
from pdmesh.frames import FrameError, discard, recv_exact_into, recv_frame, send_frame, tune_tcp
from pdmesh.kvcache.cache_store import CacheStats, CacheStore
from pdmesh.kvcache.record import NO_FINGERPRINT, checksum
from pdmesh.security import token_matches

log = logging.getLogger("pdmesh.cache_server")

PROTO_VERSION = 1
HELLO_TIMEOUT_S = 5.0  # pre-auth: the hello must arrive within this
PRE_AUTH_MAX_FRAME = (
    16 << 10
)  # pre-auth: the hello frame is small; a larger announced length closes the socket
MAX_MAC_BYTES = 64  # a put's record tag is stored opaquely, up to this size


class CacheServer:
    """Threaded TCP cache server. :meth:`start` binds and serves in background threads; :meth:`close` stops
    accepting, closes every connection and joins the threads (bounded)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        max_bytes: int = 1 << 30,
        token: str = "",
        max_connections: int = 256,
        idle_timeout_s: float = 300.0,
    ) -> None:
        self.host, self.port = host, port
        self.token = token
        self.store = CacheStore(max_bytes)
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self._lsock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> tuple[str, int]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(128)
        s.settimeout(0.5)  # accept wakes up to notice close()
        self._lsock = s
        self.port = s.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name="cache-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self.address

    def serve_forever(self) -> None:
        """Start (if needed) and block until :meth:`close` is called from another thread or a signal handler."""
        if self._lsock is None:
            self.start()
        while not self._stopping.wait(1.0):
            pass

    def close(self) -> None:
        self._stopping.set()
        if self._lsock is not None:
            with contextlib.suppress(OSError):
                self._lsock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(2.0)

    def stats(self) -> CacheStats:
        with self._lock:
            n = len(self._conns)
        return self.store.stats(n)

    # ------------------------------------------------------------------ connection handling
    def _accept_loop(self) -> None:
        assert self._lsock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    return
                log.warning("cache server: accept failed (%s); still serving", exc)
                time.sleep(0.05)  # e.g. EMFILE: let connections close
                continue
            with self._lock:
                if len(self._conns) >= self.max_connections:
                    conn.close()
                    continue
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
            t = threading.Thread(target=self._serve, args=(conn,), name="cache-conn", daemon=True)
            try:
                t.start()
            except RuntimeError:  # can't start new thread: drop this connection, keep accepting
                with self._lock:
                    self._conns.discard(conn)
                conn.close()
                continue
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        tune_tcp(conn)
        try:
            # an unauthenticated peer gets a few seconds in all (not per read) and one small frame
            hello = recv_frame(conn, PRE_AUTH_MAX_FRAME, time.monotonic() + HELLO_TIMEOUT_S)
            if hello.get("op") != "hello" or hello.get("proto") != PROTO_VERSION:
                send_frame(conn, _err("protocol", f"expected hello with proto {PROTO_VERSION}"))
                return
            if not token_matches(hello.get("token"), self.token):
                send_frame(conn, _err("unauthorized", "bad cluster token"))
                return
            send_frame(conn, {"ok": True, "proto": PROTO_VERSION})
            conn.settimeout(self.idle_timeout_s)
            while not self._stopping.is_set():
                msg = recv_frame(conn)
                try:
                    keep = self._handle(conn, msg)
                except _BadRequest as e:
                    send_frame(conn, _err("bad_request", str(e)))
                    keep = True
                if not keep:
                    return
        except (ConnectionError, TimeoutError, OSError, FrameError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _handle(self, conn: socket.socket, msg: dict) -> bool:
        """Serve one request; False to close the connection."""
        op = msg.get("op")
        if op == "put":
            n = msg.get("n")
            key = msg.get("key")
            csum = msg.get("csum")
            mac = msg.get("mac")
            if (
                not isinstance(n, int)
                or n < 0
                or not isinstance(key, bytes)
                or len(key) != 16
                or not isinstance(csum, int)
                or not isinstance(mac, bytes)
                or not 0 < len(mac) <= MAX_MAC_BYTES
                or (msg.get("fp") is not None and not isinstance(msg.get("fp"), bytes))
            ):
                send_frame(
                    conn,
                    _err(
                        "bad_request", "put needs key (16 bytes), n, csum (int), mac (bytes) and fp (bytes)"
                    ),
                )
                return False
            buf = self.store.reserve(n)
            if buf is None:
                discard(conn, n)
                send_frame(conn, {"ok": True, "stored": False})
                return True
            try:
                view = memoryview(buf)[:n]
                recv_exact_into(conn, view)
                ok = checksum(view) == msg.get("csum")
                view.release()
            except BaseException:
                self.store.unreserve(buf)
                raise
            if not ok:
                self.store.unreserve(buf)
                self.store.corrupt += 1
                send_frame(conn, _err("corrupt", "payload checksum mismatch"))
                return True
            stored = self.store.insert(key, _fp(msg.get("fp")) or NO_FINGERPRINT, csum, mac, buf, n)
            send_frame(conn, {"ok": True, "stored": stored})
        elif op == "get":
            item = self.store.acquire(_key(msg.get("key")), _fp(msg.get("fp")))
            if item is None:
                send_frame(conn, {"ok": True, "hit": False})
            else:
                try:
                    head = {
                        "ok": True,
                        "hit": True,
                        "n": item.n,
                        "csum": item.csum,
                        "mac": item.mac,
                        "fp": item.fp,
                    }
                    if (action := failpoints.claim("kvcache.cache_server.payload")) is not None:
                        payload = memoryview(item.data).cast("B")
                        send_frame(conn, head)
                        conn.sendall(payload[: len(payload) // 2])
                        failpoints.act(action)  # kill: never returns; stop/sleep: the rest follows
                        conn.sendall(payload[len(payload) // 2 :])
                    else:
                        send_frame(conn, head, item.data)
                finally:
                    self.store.release(item)
        elif op == "contains":
            send_frame(conn, {"ok": True, "n": self.store.contains(_keys(msg.get("keys")))})
        elif op == "delete":
            send_frame(conn, {"ok": True, "n": self.store.delete(_keys(msg.get("keys")))})
        elif op == "clear":
            send_frame(conn, {"ok": True, "n": self.store.clear()})
        elif op == "stats":
            send_frame(conn, {"ok": True, "stats": asdict(self.stats())})
        else:
            send_frame(conn, _err("bad_request", f"unknown op {op!r}"))
        return True


class _BadRequest(Exception):
    """A malformed field in an authenticated request: an error reply, the connection stays."""


def _key(v: object) -> bytes:
    if not isinstance(v, bytes) or len(v) != 16:
        raise _BadRequest("key must be 16 bytes")
    return v


def _fp(v: object) -> bytes | None:
    if v is not None and not isinstance(v, bytes):
        raise _BadRequest("fp must be bytes")
    return v


def _keys(v: object) -> list[bytes]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _BadRequest("keys must be a list of 16-byte keys")
    return [_key(k) for k in v]


def _err(kind: str, message: str) -> dict:
    return {"ok": False, "error": kind, "message": message}


def run_cache_server(host: str, port: int, max_bytes: int, token: str) -> None:
    """Run a cache server in the foreground until SIGINT/SIGTERM."""
    import signal

    from pdmesh.security import require_token_for_bind

    require_token_for_bind(host, token, "pdmesh cache-server")
    server = CacheServer(host, port, max_bytes, token)
    server.start()
    log.info("cache server on %s:%d, %d bytes", server.host, server.port, max_bytes)
    print(f"pdmesh cache-server listening on {server.host}:{server.port}", flush=True)

    def _stop(signum, frame):
        server._stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.serve_forever()
    finally:
        server.close()
