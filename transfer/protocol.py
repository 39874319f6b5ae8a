"""Control protocol between tier servers: :mod:`pdmesh.frames` frames over one TCP connection.

Every frame is a msgpack map with an ``op`` field. Requests and replies alternate on a connection (one request in
flight per connection; a sender pools connections for concurrency).

    hello   {v, nonce, fingerprint, engine, backends: [name...]}   ->  challenge {nonce, proof}
    auth    {proof}                                        ->  hello_ok {v, fingerprint, engine, metadata: {name: bytes}}
            (``engine``: the node's engine fingerprint digest, :func:`engines_differ` refuses a mismatch)
            (mutual challenge-response, :mod:`pdmesh.transfer.peer_auth`: the token never goes on the wire)
    alloc   {transfer_id, keys: [bytes], sizes: [int], lease_ms}    ->  alloc_ok {offsets: [int | None], lease_ms}
            (None = key already present or in flight: skip it)
    commit  {transfer_id}                                          ->  commit_ok {committed: int}   (idempotent)
    abort   {transfer_id}                                          ->  abort_ok {}                  (idempotent)
    any request                                                     ->  error {code, message, retryable}

Every socket operation has a deadline; socket failures become :class:`PeerUnavailable`, timeouts
:class:`TransferTimeout`, malformed frames :class:`TransferFailed`, error frames the typed error they carry.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from pdmesh.frames import FrameError, encode_frame
from pdmesh.frames import recv_frame as _recv_frame
from pdmesh.transfer.errors import (
    PeerUnavailable,
    TransferFailed,
    TransferTimeout,
    error_from_wire,
)

PROTOCOL_VERSION = 2  # 2: challenge-response handshake (peer_auth); the token never goes on the wire
MAX_FRAME = 16 << 20
PRE_AUTH_MAX_FRAME = 16 << 10  # hello/auth frames: an unauthenticated peer cannot make us buffer more
HELLO_TIMEOUT_S = 5.0  # an unauthenticated peer gets this long to complete the handshake


def send_frame(sock: socket.socket, msg: dict[str, Any], deadline: float) -> None:
    """Send one frame by ``deadline`` (time.monotonic)."""
    try:
        data = encode_frame(msg, MAX_FRAME)
    except FrameError as exc:
        raise TransferFailed(str(exc)) from exc
    _settimeout(sock, deadline)
    try:
        sock.sendall(data)
    except TimeoutError as exc:
        raise TransferTimeout("send timed out") from exc
    except OSError as exc:
        raise PeerUnavailable(f"send failed: {exc}") from exc


def recv_frame(sock: socket.socket, deadline: float | None, max_frame: int = MAX_FRAME) -> dict[str, Any]:
    """Receive one whole frame by ``deadline`` (None = the socket's current timeout per read). Before a peer is
    authenticated pass ``max_frame=PRE_AUTH_MAX_FRAME``: the length is checked before the body is read."""
    try:  # with a deadline, frames.recv_exact_into sets the time left before every read
        msg = _recv_frame(sock, max_frame, deadline)
    except TimeoutError as exc:
        raise TransferTimeout("receive timed out") from exc
    except ConnectionError as exc:
        raise PeerUnavailable(f"connection closed by peer: {exc}") from exc
    except OSError as exc:
        raise PeerUnavailable(f"receive failed: {exc}") from exc
    except FrameError as exc:
        raise TransferFailed(f"bad frame: {exc}") from exc
    if "op" not in msg:
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


def no_engine() -> str:
    """The engine fingerprint of a node that has none (yet): never compared."""
    return ""


def engines_differ(mine: str, theirs: object) -> bool:
    """True when both sides of a handshake know their engine fingerprint (the digest of the model fingerprint:
    model, dtype, KV layout and geometry) and the two differ: such a peer is refused."""
    return bool(mine) and isinstance(theirs, str) and bool(theirs) and theirs != mine
