"""Plain TCP data path: needs nothing but Python; bytes go straight from/to pool memory.

Receiver: a listener thread plus one thread per data connection (at most ``MAX_DATA_CONNECTIONS``; more are
closed at accept). A connection starts with the mutual challenge-response of :mod:`pdmesh.transfer.peer_auth`
(``data_hello {fingerprint, nonce}`` -> ``challenge`` -> ``auth`` -> ``data_hello_ok``: the token never goes on
the wire); then each batch is a ``write {notif, segs: [[remote_offset, length], ...]}``
frame (see :mod:`pdmesh.transfer.protocol`) followed by the raw bytes of all segments in order, received with
``recv_into`` straight into slices of the pool buffer (no intermediate bytes objects); the receiver answers
``write_ok`` (or ``error``) once all bytes are in. Before receiving, the write guard (the Receiver's lease table)
must admit the batch: it returns the deadline by which the bytes must arrive, so a late write can never land
after its lease expired. A refused or failed batch closes the connection.

Sender: one data socket per ``connect`` (the sender pools connections), one batch at a time per socket;
``sendall`` from memoryview slices of the local buffer. Every socket operation is bounded by the deadline.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pdmesh.transfer.backend import (
    BackendOptions,
    Segment,
    TransferBackend,
    WriteGuard,
    WriteHandle,
    check_segments,
    pack_metadata,
    unpack_metadata,
)
from pdmesh.transfer.errors import (
    IncompatiblePeer,
    PeerUnavailable,
    TransferError,
    TransferFailed,
    TransferTimeout,
    error_from_wire,
)
from pdmesh.transfer.peer_auth import client_handshake, server_handshake
from pdmesh.transfer.protocol import connect as tcp_connect
from pdmesh.transfer.protocol import recv_frame, send_frame

SOCK_BUF = 8 << 20
IO_TIMEOUT_S = 30.0
MAX_DATA_CONNECTIONS = 256
MAX_NOTIFS = 4096


@dataclass
class _Peer:
    sock: socket.socket
    size: int
    lock: threading.Lock


@dataclass(frozen=True)
class TcpWrite(WriteHandle):
    """A checked batch for ``peer`` (a data connection): :meth:`TcpBackend.wait` sends it and awaits ``write_ok``."""

    segments: Sequence[Segment]
    notif: bytes


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)


class TcpBackend(TransferBackend[TcpWrite]):
    """``host`` is where the receiver's data listener binds (and what it advertises); ``token`` the cluster token."""

    name = "tcp"

    def __init__(
        self, fingerprint: str, token: str = "", host: str = "127.0.0.1", advertise_host: str | None = None
    ) -> None:
        """``host``: where the data listener binds (may be a wildcard); ``advertise_host``: what the metadata
        tells senders to dial (default ``host``; required in effect when ``host`` is a wildcard)."""
        super().__init__(fingerprint)
        self.token = token
        self.host = host
        self.advertise_host = (advertise_host or host).strip("[]")  # a bare address, as sockets want it
        self._buf: memoryview | None = None
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()
        self._guard: WriteGuard | None = None
        self._notifs: deque[tuple[str, bytes]] = deque(maxlen=MAX_NOTIFS)
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._closed = threading.Event()

    @classmethod
    def from_options(cls, options: BackendOptions) -> TcpBackend:
        """Uses ``fingerprint``, ``token``, ``host`` and ``advertise_host``."""
        return cls(options.fingerprint, options.token, options.host, options.advertise_host)

    # both sides
    def register_memory(self, buffer: memoryview, segment_name: str | None = None) -> None:
        self._buf = buffer

    def local_metadata(self) -> bytes:
        """Receiver side: starts the data listener on first call."""
        if self._buf is None:
            raise TransferFailed("register_memory first")
        with self._lock:
            if self._listener is None:
                ls = socket.create_server((self.host, 0), backlog=64)
                self._listener = ls
                threading.Thread(target=self._accept_loop, name="pdmesh-tcp-accept", daemon=True).start()
            port = self._listener.getsockname()[1]
        return pack_metadata(
            self.name, self.fingerprint, {"host": self.advertise_host, "port": port, "size": self._buf.nbytes}
        )

    def set_write_guard(self, guard: WriteGuard) -> None:
        self._guard = guard

    def get_notifs(self) -> list[tuple[str, bytes]]:
        out = []
        while self._notifs:
            out.append(self._notifs.popleft())
        return out

    # sender side
    def connect(self, peer_metadata: bytes) -> str:
        md = unpack_metadata(peer_metadata, self.name, self.fingerprint)
        deadline = time.monotonic() + IO_TIMEOUT_S
        sock = tcp_connect((str(md["host"]), int(md["port"])), deadline)
        try:
            _tune(sock)
            client_handshake(
                sock,
                {"op": "data_hello", "fingerprint": self.fingerprint},
                "data_hello_ok",
                self.token,
                deadline,
            )
        except BaseException:
            sock.close()
            raise
        peer = uuid.uuid4().hex
        with self._lock:
            self._peers[peer] = _Peer(sock, int(md["size"]), threading.Lock())
        return peer

    def write(self, peer: str, segments: Sequence[Segment], notif: bytes) -> TcpWrite:
        p = self._peers.get(peer)
        if p is None or self._buf is None:
            raise PeerUnavailable(f"tcp peer {peer} not connected")
        check_segments(segments, self._buf.nbytes, p.size)
        return TcpWrite(peer, list(segments), notif)

    def wait(self, handle: TcpWrite, deadline: float) -> None:
        p = self._peers.get(handle.peer)
        if p is None or self._buf is None:
            raise PeerUnavailable(f"tcp peer {handle.peer} disconnected")
        with p.lock:
            try:
                send_frame(
                    p.sock,
                    {
                        "op": "write",
                        "notif": handle.notif,
                        "segs": [[s.remote_offset, s.length] for s in handle.segments],
                    },
                    deadline,
                )
                for s in handle.segments:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TransferTimeout("tcp write passed its deadline")
                    p.sock.settimeout(remaining)
                    with self._buf[s.local_offset : s.local_offset + s.length] as view:
                        p.sock.sendall(view)
                reply = recv_frame(p.sock, deadline)
                if reply["op"] == "error":
                    raise error_from_wire(reply)
                if reply["op"] != "write_ok":
                    raise TransferFailed(f"unexpected reply {reply['op']}")
            except TimeoutError as exc:
                self._drop(handle.peer)
                raise TransferTimeout("tcp write passed its deadline") from exc
            except OSError as exc:
                self._drop(handle.peer)
                raise PeerUnavailable(f"tcp write failed: {exc}") from exc
            except TransferError:
                self._drop(handle.peer)
                raise

    def disconnect(self, peer: str) -> None:
        self._drop(peer)

    def _drop(self, peer: str) -> None:
        with self._lock:
            p = self._peers.pop(peer, None)
        if p is not None:
            p.sock.close()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
            conns, self._conns = list(self._conns), set()
            ls, self._listener = self._listener, None
        for p in peers:
            p.sock.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)  # unblocks accept()
            ls.close()

    # receiver side
    def _accept_loop(self) -> None:
        ls = self._listener
        assert ls is not None
        while not self._closed.is_set():
            try:
                conn, addr = ls.accept()
            except OSError as exc:
                if self._closed.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    return
                time.sleep(0.05)  # e.g. EMFILE: let connections close, keep serving
                continue
            with self._lock:
                full = len(self._conns) >= MAX_DATA_CONNECTIONS
                if not full:
                    self._conns.add(conn)
            if full:
                conn.close()
                continue
            try:
                _tune(conn)
                threading.Thread(
                    target=self._serve,
                    args=(conn, f"{addr[0]}:{addr[1]}"),
                    name="pdmesh-tcp-data",
                    daemon=True,
                ).start()
            except (OSError, RuntimeError):  # RuntimeError: can't start new thread
                with self._lock:
                    self._conns.discard(conn)
                conn.close()

    def _check_data_hello(self, hello: dict) -> None:
        if hello.get("op") != "data_hello" or hello.get("fingerprint") != self.fingerprint:
            raise IncompatiblePeer("data connection: fingerprint mismatch or bad hello")

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            server_handshake(conn, self.token, self._check_data_hello)
            send_frame(conn, {"op": "data_hello_ok"}, time.monotonic() + IO_TIMEOUT_S)
            while not self._closed.is_set():
                conn.settimeout(None)  # idle between batches: wait for the next header or close
                frame = recv_frame(conn, None)
                self._receive_batch(conn, peer, frame)
        except TransferError as exc:
            with contextlib.suppress(TransferError, OSError):
                send_frame(conn, exc.to_wire(), time.monotonic() + 1.0)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _receive_batch(self, conn: socket.socket, peer: str, frame: dict) -> None:
        buf = self._buf
        if frame.get("op") != "write" or buf is None:
            raise TransferFailed("expected a write frame")
        notif = bytes(frame["notif"])
        segs = [(int(o), int(n)) for o, n in frame["segs"]]
        for off, n in segs:
            if off < 0 or n < 0 or off + n > buf.nbytes:
                raise TransferFailed(f"segment ({off}, {n}) outside the pool")
        guard = self._guard
        deadline = guard.begin_write(notif, segs) if guard else time.monotonic() + IO_TIMEOUT_S
        if deadline is None:
            raise TransferFailed("write refused: no live lease covers it", retryable=True)
        ok = False
        try:
            for off, n in segs:
                got = 0
                while got < n:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TransferTimeout("write did not arrive before its lease deadline")
                    conn.settimeout(remaining)
                    with buf[off + got : off + n] as view:
                        k = conn.recv_into(view)
                    if k == 0:
                        raise PeerUnavailable("sender closed the data connection mid-write")
                    got += k
            ok = True
        except TimeoutError as exc:
            raise TransferTimeout("write did not arrive before its lease deadline") from exc
        finally:
            if guard:
                guard.end_write(notif, ok)
        self._notifs.append((peer, notif))
        send_frame(conn, {"op": "write_ok"}, time.monotonic() + IO_TIMEOUT_S)
