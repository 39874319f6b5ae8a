"""Length-prefixed msgpack frames, optionally followed by a raw payload: the wire format of the cache server
(TCP) and of the tier server's control socket (unix).

A frame is a 4-byte big-endian length ``N`` (at most :data:`MAX_FRAME`) and ``N`` bytes of a msgpack map. When the
map has a positive integer ``"n"``, exactly ``n`` raw payload bytes follow the frame (chunk bytes are never put
inside msgpack; they are streamed and received straight into a preallocated buffer with ``recv_into``).

Sync helpers use the socket's own timeout (``socket.settimeout``): they raise ``TimeoutError`` or ``OSError``;
``ConnectionError`` when the peer closes mid-frame; :class:`ProtocolError` for a malformed frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

import msgpack

MAX_FRAME = 1 << 20
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """A malformed or oversized frame."""


def encode_frame(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def _decode(body: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False)
    except Exception as e:  # msgpack raises several types
        raise ProtocolError(f"undecodable frame: {e}") from e
    if not isinstance(msg, dict):
        raise ProtocolError("a frame must be a msgpack map")
    return msg


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket (no intermediate copies)."""
    got, total = 0, len(view)
    while got < total:
        n = sock.recv_into(view[got:], total - got)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    head = bytearray(4)
    recv_exact_into(sock, memoryview(head))
    (length,) = _LEN.unpack(head)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    body = bytearray(length)
    recv_exact_into(sock, memoryview(body))
    return _decode(bytes(body))


def send_frame(sock: socket.socket, msg: dict[str, Any], payload=None) -> None:
    """Send a frame and, if given, its payload (whose length must equal ``msg["n"]``)."""
    frame = encode_frame(msg)
    if payload is None:
        sock.sendall(frame)
        return
    view = memoryview(payload).cast("B")
    if len(view) <= 65536:
        sock.sendall(frame + bytes(view))
    else:
        sock.sendall(frame)
        sock.sendall(view)


def discard(sock: socket.socket, n: int) -> None:
    """Read and drop ``n`` payload bytes (keeps a connection in sync after a refused payload)."""
    buf = memoryview(bytearray(min(n, 1 << 20)))
    while n > 0:
        chunk = buf[: min(n, len(buf))]
        recv_exact_into(sock, chunk)
        n -= len(chunk)


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Read one frame (no payload) from an asyncio stream. IncompleteReadError when the peer closes."""
    (length,) = _LEN.unpack(await reader.readexactly(4))
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return _decode(await reader.readexactly(length))


def tune_tcp(sock: socket.socket) -> None:
    """TCP_NODELAY (no Nagle delay on request/response) and large buffers for chunk payloads."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
