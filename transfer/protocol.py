"""Control protocol between tier servers: length-prefixed msgpack frames over one TCP connection.

Frame: 4-byte big-endian length, then a msgpack map with an ``op`` field. Requests and replies alternate on a
connection (one request in flight per connection; a sender pools connections for concurrency).

    hello   {v, token, fingerprint, backends: [name...], host_id}  ->  hello_ok {v, fingerprint, metadata: {name: bytes}}
    alloc   {transfer_id, keys: [bytes], sizes: [int], lease_ms}    ->  alloc_ok {offsets: [int | None], lease_ms}
            (None = key already present or in flight: skip it)
    commit  {transfer_id}                                          ->  commit_ok {committed: int}   (idempotent)
    abort   {transfer_id}                                          ->  abort_ok {}                  (idempotent)
    any request                                                     ->  error {code, message, retryable}

Every socket operation has a timeout; socket failures become :class:`PeerUnavailable`, timeouts
:class:`TransferTimeout`, error frames the typed error they carry.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import msgpack

from pdmesh.transfer.errors import (
    PeerUnavailable,
    TransferError,
    TransferFailed,
    TransferTimeout,
    error_from_wire,
)

PROTOCOL_VERSION = 1
MAX_FRAME = 16 << 20
_LEN = struct.Struct(">I")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerUnavailable("connection closed by peer")
        got += k
    return bytes(buf)


def encode_frame(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise TransferFailed(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def send_frame(sock: socket.socket, msg: dict[str, Any], deadline: float) -> None:
    """Send one frame by ``deadline`` (time.monotonic)."""
    data = encode_frame(msg)
    _settimeout(sock, deadline)
    try:
        sock.sendall(data)
    except TimeoutError as exc:
        raise TransferTimeout("send timed out") from exc
    except OSError as exc:
        raise PeerUnavailable(f"send failed: {exc}") from exc


def recv_frame(sock: socket.socket, deadline: float | None) -> dict[str, Any]:
    """Receive one frame by ``deadline`` (None = the socket's current timeout)."""
    if deadline is not None:
        _settimeout(sock, deadline)
    try:
        (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
        if n > MAX_FRAME:
            raise TransferFailed(f"peer sent a frame of {n} bytes (max {MAX_FRAME})")
        msg = msgpack.unpackb(_recv_exact(sock, n), raw=False)
    except TimeoutError as exc:
        raise TransferTimeout("receive timed out") from exc
    except TransferError:
        raise
    except OSError as exc:
        raise PeerUnavailable(f"receive failed: {exc}") from exc
    except Exception as exc:
        raise TransferFailed(f"bad frame: {exc}") from exc
    if not isinstance(msg, dict) or "op" not in msg:
        raise TransferFailed("bad frame: not a map with an op")
    return msg


def request(sock: socket.socket, msg: dict[str, Any], expect: str, deadline: float) -> dict[str, Any]:
    """Send a request and return the reply; an error frame raises its typed error."""
    send_frame(sock, msg, deadline)
    reply = recv_frame(sock, deadline)
    if reply["op"] == "error":
        raise error_from_wire(reply)
    if reply["op"] != expect:
        raise TransferFailed(f"expected {expect}, got {reply['op']}")
    return reply


def _settimeout(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TransferTimeout("deadline passed")
    sock.settimeout(remaining)


def connect(address: tuple[str, int], deadline: float) -> socket.socket:
    """Open a control connection (TCP_NODELAY) by ``deadline``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TransferTimeout("deadline passed before connect")
    try:
        sock = socket.create_connection(address, timeout=remaining)
    except TimeoutError as exc:
        raise TransferTimeout(f"connect to {address} timed out") from exc
    except OSError as exc:
        raise PeerUnavailable(f"cannot connect to {address}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
