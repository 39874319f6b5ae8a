"""The pdmesh cache server: a standalone shared remote tier (the role of ``lmcache_server``).

Protocol (TCP, :mod:`kvcache.wire` frames, one request at a time per connection, replies in order):

* ``{"op": "hello", "proto": 1, "token": str}`` must come first -> ``{"ok": true, "proto": 1}``; a wrong token or
  protocol version gets an error reply and the connection is closed.
* ``{"op": "put", "key": bytes16, "fp": bytes16, "n": int, "csum": int}`` + ``n`` payload bytes ->
  ``{"ok": true, "stored": bool}``. The server verifies the xxh3-64 checksum before storing; a mismatch is an
  error reply (``corrupt``) and nothing is stored.
* ``{"op": "get", "key": bytes16, "fp": bytes16 | None}`` -> ``{"ok": true, "hit": false}`` or
  ``{"ok": true, "hit": true, "n": int, "csum": int, "fp": bytes16}`` + ``n`` payload bytes (the client verifies).
  With ``fp`` given, a chunk stored under another fingerprint is a miss.
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
import logging
import socket
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass

from pdmesh.frames import FrameError, discard, recv_exact_into, recv_frame, send_frame, tune_tcp
from pdmesh.kvcache.record import NO_FINGERPRINT, checksum
from pdmesh.security import token_matches

log = logging.getLogger("pdmesh.cache_server")

PROTO_VERSION = 1


@dataclass
class _Item:
    fp: bytes
    csum: int
    buf: bytearray  # capacity rounded up to a page; the payload is buf[:n]
    n: int
    refs: int = 0  # readers currently sending it
    dead: bool = False  # removed from the index; recycle buf when refs drop to 0

    @property
    def data(self) -> memoryview:
        return memoryview(self.buf)[: self.n]


@dataclass(frozen=True)
class CacheStats:
    items: int
    used_bytes: int
    max_bytes: int
    hits: int
    misses: int
    puts: int
    evictions: int
    corrupt: int
    connections: int
    buffer_bytes: int = 0


def _capacity(n: int) -> int:
    return max(_PAGE, -(-n // _PAGE) * _PAGE)


_PAGE = 4096


class CacheStore:
    """Byte-bounded LRU of verified chunk payloads. Thread-safe.

    Memory: payload buffers are recycled (free lists per page-rounded size) instead of freed, so a full cache
    that keeps evicting never page-faults new memory (first-touch faults dominate put cost on VMs). All buffers,
    live, reserved and free, stay within ``max_bytes``. A buffer being sent by a reader (``acquire``) is never
    recycled before ``release``."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes, _Item] = OrderedDict()
        self._used = 0  # capacity of live items' buffers
        self._buffers = 0  # capacity of every buffer we hold (live, reserved, free, dead-in-use)
        self._free: dict[int, list[bytearray]] = {}
        self.hits = self.misses = self.puts = self.evictions = self.corrupt = 0

    # ------------------------------------------------------------------ buffers (lock held)
    def _kill(self, key: bytes) -> None:
        item = self._items.pop(key)
        self._used -= len(item.buf)
        item.dead = True
        if item.refs == 0:
            self._free.setdefault(len(item.buf), []).append(item.buf)

    def _drop_free(self, need: int) -> None:
        for cap in list(self._free):
            lst = self._free[cap]
            while lst and self._buffers + need > self.max_bytes:
                lst.pop()
                self._buffers -= cap
            if not lst:
                del self._free[cap]

    def reserve(self, n: int) -> bytearray | None:
        """A buffer of at least ``n`` bytes for an incoming payload (evicting LRU items if needed), or None when
        ``n`` cannot fit. Give it back with :meth:`insert` or :meth:`unreserve`."""
        cap = _capacity(n)
        if cap > self.max_bytes:
            return None
        with self._lock:
            while True:
                lst = self._free.get(cap)
                if lst:
                    buf = lst.pop()
                    if not lst:
                        del self._free[cap]
                    return buf
                self._drop_free(cap)
                if self._buffers + cap <= self.max_bytes:
                    self._buffers += cap
                    break
                if not self._items:
                    return None  # everything is reserved or being sent
                self._kill(next(iter(self._items)))
                self.evictions += 1
        return bytearray(cap)

    def unreserve(self, buf: bytearray) -> None:
        with self._lock:
            self._free.setdefault(len(buf), []).append(buf)

    def insert(self, key: bytes, fp: bytes, csum: int, buf: bytearray, n: int) -> bool:
        """Index a received, verified payload. False (buffer recycled) if the key is already present."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self._free.setdefault(len(buf), []).append(buf)
                return False
            self._items[key] = _Item(fp, csum, buf, n)
            self._used += len(buf)
            self.puts += 1
            return True

    def put(self, key: bytes, data, fp: bytes = NO_FINGERPRINT) -> bool:
        """Copy ``data`` in (for in-process use and tests)."""
        view = memoryview(data).cast("B")
        buf = self.reserve(len(view))
        if buf is None:
            return False
        buf[: len(view)] = view
        return self.insert(key, fp, checksum(view), buf, len(view))

    def acquire(self, key: bytes, fp: bytes | None) -> _Item | None:
        """The item for ``key`` with a reader reference (call :meth:`release`), or None (counted as a miss)."""
        with self._lock:
            item = self._items.get(key)
            if item is None or (fp is not None and item.fp != fp):
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            item.refs += 1
            return item

    def release(self, item: _Item) -> None:
        with self._lock:
            item.refs -= 1
            if item.dead and item.refs == 0:
                self._free.setdefault(len(item.buf), []).append(item.buf)

    def contains(self, keys: list[bytes]) -> int:
        n = 0
        with self._lock:
            for k in keys:
                if k not in self._items:
                    break
                n += 1
        return n

    def delete(self, keys: list[bytes]) -> int:
        n = 0
        with self._lock:
            for k in keys:
                if k in self._items:
                    self._kill(k)
                    n += 1
        return n

    def clear(self) -> int:
        with self._lock:
            keys = list(self._items)
            for k in keys:
                self._kill(k)
            return len(keys)

    def stats(self, connections: int = 0) -> CacheStats:
        with self._lock:
            return CacheStats(
                len(self._items),
                self._used,
                self.max_bytes,
                self.hits,
                self.misses,
                self.puts,
                self.evictions,
                self.corrupt,
                connections,
                self._buffers,
            )


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
            except OSError:
                return
            with self._lock:
                if len(self._conns) >= self.max_connections:
                    conn.close()
                    continue
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
            t = threading.Thread(target=self._serve, args=(conn,), name="cache-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.idle_timeout_s)
        tune_tcp(conn)
        try:
            hello = recv_frame(conn)
            if hello.get("op") != "hello" or hello.get("proto") != PROTO_VERSION:
                send_frame(conn, _err("protocol", f"expected hello with proto {PROTO_VERSION}"))
                return
            if not token_matches(hello.get("token"), self.token):
                send_frame(conn, _err("unauthorized", "bad cluster token"))
                return
            send_frame(conn, {"ok": True, "proto": PROTO_VERSION})
            while not self._stopping.is_set():
                msg = recv_frame(conn)
                if not self._handle(conn, msg):
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
            if not isinstance(n, int) or n < 0 or not isinstance(key, bytes) or len(key) != 16:
                send_frame(conn, _err("bad_request", "put needs key (16 bytes) and n"))
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
            stored = self.store.insert(key, msg.get("fp") or NO_FINGERPRINT, msg["csum"], buf, n)
            send_frame(conn, {"ok": True, "stored": stored})
        elif op == "get":
            item = self.store.acquire(msg.get("key"), msg.get("fp"))
            if item is None:
                send_frame(conn, {"ok": True, "hit": False})
            else:
                try:
                    send_frame(
                        conn,
                        {"ok": True, "hit": True, "n": item.n, "csum": item.csum, "fp": item.fp},
                        item.data,
                    )
                finally:
                    self.store.release(item)
        elif op == "contains":
            send_frame(conn, {"ok": True, "n": self.store.contains(list(msg.get("keys") or []))})
        elif op == "delete":
            send_frame(conn, {"ok": True, "n": self.store.delete(list(msg.get("keys") or []))})
        elif op == "clear":
            send_frame(conn, {"ok": True, "n": self.store.clear()})
        elif op == "stats":
            send_frame(conn, {"ok": True, "stats": asdict(self.stats())})
        else:
            send_frame(conn, _err("bad_request", f"unknown op {op!r}"))
        return True


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
