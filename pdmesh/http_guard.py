"""The HTTP/1.1 protocol of every pdmesh HTTP listener (the router, the tier server's API): uvicorn's httptools
protocol with two bounds on work before a request exists.

- **Header timeout**: a connection must deliver a complete request head within ``header_timeout_s`` of opening
  (and of each later request's first byte); a slowloris client that trickles or never sends headers is closed.
  Idle time between requests is uvicorn's own keep-alive timeout.
- **No trickled leftovers**: a response sent before the request body was all read (an early 401/413/408) closes
  the connection ``header_timeout_s`` later instead of keeping it alive for the rest of the body.
- **Connection cap**: at most ``max_connections`` open client connections per router process; one more is closed
  at once, before any byte is parsed (request bodies are bounded by each service: the router's
  ``max_body_bytes``/``body_timeout_s``, the tier API's ``MAX_BODY_BYTES``).

Used through :func:`guarded_protocol`, which binds the two numbers (uvicorn instantiates the class itself).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    max_connections: int = 4096
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.abort()  # connection_lost follows and discards it from the set
            return
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

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

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these bounds."""
    return type(
        "RouterHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout_s": header_timeout_s, "max_connections": max_connections},
    )
