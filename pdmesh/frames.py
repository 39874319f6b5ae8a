"""Length-prefixed msgpack frames: the one wire codec of pdmesh's binary protocols (the tier server's control
socket, the cache server, the transfer control connection and the TCP transfer backend).

A frame is a 4-byte big-endian length ``N`` (at most the protocol's ``max_frame``) and ``N`` bytes of a msgpack
map. A protocol may let a frame announce a raw payload that follows it (the cache server: a positive integer
``"n"``); chunk bytes never go inside msgpack: they are streamed and received straight into a preallocated
buffer with ``recv_into``.

Sync helpers use the socket's own timeout (``socket.settimeout``): they raise ``TimeoutError`` or ``OSError``;
``ConnectionError`` when the peer closes mid-frame; :class:`FrameError` for a malformed or oversized frame (the
length is checked before any byte of the body is read, so an oversized frame costs nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from typing import Any

import msgpack

MAX_FRAME = 1 << 20  # the default limit; each protocol passes its own
_LEN = struct.Struct(">I")


class FrameError(Exception):
    """A malformed or oversized frame."""


def encode_frame(msg: dict[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameError(f"frame of {len(body)} bytes exceeds {max_frame}")
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """The msgpack map of a frame's body; FrameError for anything else."""
    try:
        msg = msgpack.unpackb(body, raw=False)
    except Exception as e:  # msgpack raises several types
        raise FrameError(f"undecodable frame: {e}") from e
    if not isinstance(msg, dict):
        raise FrameError("a frame must be a msgpack map")
    return msg


def _check_length(head: bytes, max_frame: int) -> int:
    (length,) = _LEN.unpack(head)
    if length > max_frame:
        raise FrameError(f"frame of {length} bytes exceeds {max_frame}")
    return length


def recv_exact_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill ``view`` from the socket (no intermediate copies). ConnectionError when the peer closes.

    With ``deadline`` (``time.monotonic()``) the whole read must finish by then (TimeoutError): the socket timeout
    is set to the time left before every ``recv_into``, so a peer trickling one byte at a time cannot stretch it.
    Without, each ``recv_into`` gets the socket's own timeout."""
    got, total = 0, len(view)
    while got < total:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("read deadline passed")
            sock.settimeout(left)
        n = sock.recv_into(view[got:], total - got)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def recv_frame(
    sock: socket.socket, max_frame: int = MAX_FRAME, deadline: float | None = None
) -> dict[str, Any]:
    """One frame; with ``deadline`` the whole frame must arrive by then (see :func:`recv_exact_into`)."""
    head = bytearray(_LEN.size)
    recv_exact_into(sock, memoryview(head), deadline)
    body = bytearray(_check_length(bytes(head), max_frame))
    recv_exact_into(sock, memoryview(body), deadline)
    return decode_body(bytes(body))


def send_frame(sock: socket.socket, msg: dict[str, Any], payload=None, max_frame: int = MAX_FRAME) -> None:
    """Send a frame and, if given, its raw payload right after it."""
    frame = encode_frame(msg, max_frame)
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


async def read_frame(reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> dict[str, Any]:
    """Read one frame (no payload) from an asyncio stream. IncompleteReadError when the peer closes."""
    length = _check_length(await reader.readexactly(_LEN.size), max_frame)
    return decode_body(await reader.readexactly(length))


def tune_tcp(sock: socket.socket) -> None:
    """TCP_NODELAY (no Nagle delay on request/response) and large buffers for chunk payloads."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
