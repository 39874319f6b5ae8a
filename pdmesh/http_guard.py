"""The HTTP/1.1 protocol of every pdmesh HTTP listener (the router, the tier server's API): uvicorn's httptools
protocol with bounds on work before a request exists.

- **Header timeout**: a connection must deliver a complete request head within ``header_timeout_s`` of opening
  (and of each later request's first byte); a slowloris client that trickles or never sends headers is closed.
  Idle time between requests is uvicorn's own keep-alive timeout.
- **Head size**: a request head (request line and header fields) of more than ``max_head_bytes`` is answered
  ``431`` (an OpenAI-style JSON error, code ``request_head_too_large``) with ``Connection: close`` before the
  request exists: the app never sees it. A head still arriving is refused as soon as the bytes received for it
  pass the limit (the parser, which buffers a partial header field, never holds much more than that: at most one
  more read of the socket); a complete head is measured exactly (its request line and fields, less optional
  whitespace). After the 431 the client's further bytes are read and dropped, unparsed, for at most
  ``header_timeout_s`` (a client still sending its head gets to read the answer instead of a reset), then the
  connection is closed. A head past the limit pipelined behind requests still being answered is answered after
  them, in order (their responses are sent in full; nothing after the refused head is parsed).
  (uvicorn's own ``h11_max_incomplete_event_size`` bounds only its h11 protocol, not this httptools one.)
- **No trickled leftovers**: a response sent before the request body was all read (an early 401/413/408) closes
  the connection ``header_timeout_s`` later instead of keeping it alive for the rest of the body.
- **Connection cap**: at most ``max_connections`` open client connections per router process; one more is closed
  at once, before any byte is parsed (request bodies are bounded by each service: the router's
  ``max_body_bytes``/``body_timeout_s``, the tier API's ``MAX_BODY_BYTES``).

Used through :func:`guarded_protocol`, which binds the numbers (uvicorn instantiates the class itself).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

DEFAULT_MAX_HEAD_BYTES = 64 * 1024


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    max_connections: int = 4096
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    _head_timer: asyncio.TimerHandle | None = None
    # Per connection: a request head may be arriving (from the connection's start and from the end of each
    # request's body to the end of the next head), the bytes received while it was, and whether the connection
    # was refused for its head (431 sent; everything it still sends is dropped).
    _in_head: bool = True
    _head_bytes: int = 0
    _refused: bool = False
    _refusal_waits: bool = False  # the 431 follows the responses still in progress (pipelined requests)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.abort()  # connection_lost follows and discards it from the set
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the answer (431) is out: drop, unparsed, until the client or the header timer closes
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._refuse_head()  # still no complete head and already past the limit

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._in_head = False
        if self._head_size() > self.max_head_bytes:
            self._refuse_head()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # the next request's head may start now

    def on_response_complete(self) -> None:
        # Answered before the request body was all read (401/413/408 at the edge): the rest of the body would
        # keep the connection open for as long as the client trickles it. No keep-alive: the rest is read and
        # dropped for at most ``header_timeout_s`` (a client still sending a large body gets to read the answer
        # instead of a reset), then the connection is closed.
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self.server_state.total_requests += 1
            self.flow.resume_reading()  # drain (and drop) the rest, so the client can finish and read the answer
            self._disarm()
            self._arm()
            return
        super().on_response_complete()
        if self._refusal_waits and self.cycle.response_complete and not self.transport.is_closing():
            self._refusal_waits = False  # the last response before the refused head is out: its turn
            self._unset_keepalive_if_required()
            self._answer_431()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_size(self) -> int:
        """The complete head's size as sent, less optional whitespace: ``METHOD SP url SP HTTP/x.y CRLF``, each
        ``name: value CRLF``, the final CRLF."""
        fields = sum(len(name) + len(value) + 4 for name, value in self.headers)
        return len(self.parser.get_method()) + len(self.url) + 12 + fields + 2

    def _refuse_head(self) -> None:
        """Stop parsing and answer 431, now or after the responses still in progress (pipelining)."""
        self._refused, self._in_head = True, False
        if self.cycle is not None and not self.cycle.response_complete:
            self._refusal_waits = True  # on_response_complete answers it after the last of them
            return
        self._answer_431()

    def _answer_431(self) -> None:
        """Send the 431 and end the response stream; the connection closes ``header_timeout_s`` later at the
        latest (sooner when the client closes its side)."""
        body = (
            b'{"error": {"message": "request head (request line and headers) larger than %d bytes", '
            b'"type": "invalid_request_error", "param": null, "code": "request_head_too_large"}}'
            % self.max_head_bytes
        )
        head = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client sees the answer's end now, while what it still sends drains
        self.flow.resume_reading()
        self._disarm()
        self._arm()

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(
    header_timeout_s: float, max_connections: int, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these bounds (``max_head_bytes``: the largest
    request head, request line and header fields, in bytes; more is answered 431)."""
    return type(
        "RouterHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "max_connections": max_connections,
            "max_head_bytes": max_head_bytes,
        },
    )
