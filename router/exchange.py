"""One client HTTP exchange on raw ASGI: request headers, bounded body, disconnect watch, response sending.

The completion routes are the router's hot path and run on this instead of Starlette's Request/Response
(measured here: a FastAPI route costs ~145 us of CPU per request, raw ASGI under uvicorn ~50 us).

Contract:
- :meth:`Exchange.read_body` enforces ``max_bytes`` (:func:`read_limited`, which the FastAPI routes use too)
  and raises :class:`ClientGone` if the client disconnects while sending it; :func:`read_within` bounds a body
  read in time (408), on the completion routes and the passthrough routes alike.
- :meth:`Exchange.watched` runs a coroutine function in the current task while watching for the client's
  disconnect; a disconnect cancels it and :class:`ClientGone` is raised instead of the cancellation.
- :meth:`Exchange.respond` / :meth:`Exchange.start_stream` + :meth:`Exchange.send_chunk` + :meth:`Exchange.end`
  send the response; ``started`` tells whether its first byte went out (after that, errors go into the stream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pdmesh.router.errors import OpenAIError

T = TypeVar("T")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


_SSE_DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected."""


class Exchange:
    __slots__ = ("_done", "_receive", "_send", "scope", "started", "status")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.started = False
        self.status = 0
        self._done = False  # the last body message is being sent: a disconnect from now on is not a loss

    def header(self, name: bytes) -> str | None:
        """The first value of request header ``name`` (lower-case bytes), decoded as latin-1, or None."""
        for k, v in self.scope["headers"]:
            if k == name:
                return v.decode("latin-1")
        return None

    async def read_body(self, max_bytes: int) -> bytes:
        return await read_limited(self._body_parts(), self.header(b"content-length"), max_bytes)

    async def _body_parts(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            yield message.get("body", b"")
            if not message.get("more_body"):
                return

    async def watched(self, run: Callable[[], Awaitable[T]]) -> T:
        """Await ``run()`` in this task; if the client disconnects meanwhile, cancel it and raise ClientGone.

        Call only after the body was read (the next ASGI message is then the disconnect).
        """
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while True:
                if (await self._receive())["type"] == "http.disconnect":
                    if not self._done:  # uvicorn reports a completed response as a disconnect
                        gone = True
                        task.cancel()
                    return

        watcher = asyncio.create_task(watch())
        try:
            return await run()
        except asyncio.CancelledError:
            if gone and task.uncancel() == 0:
                raise ClientGone() from None
            raise
        finally:
            watcher.cancel()

    async def respond(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """Send a whole response (JSON unless ``headers`` say otherwise)."""
        self.started = True
        self.status = status
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    *headers,
                ],
            }
        )
        self._done = True
        await self._send({"type": "http.response.body", "body": body})

    async def error(self, err: OpenAIError) -> None:
        """Send ``err`` as an OpenAI error body (only before the response started)."""
        headers = [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
        await self.respond(err.status, json.dumps(err.body()).encode(), headers)

    async def start_stream(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        self.status = 200
        await self._send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                    *headers,
                ],
            }
        )

    async def send_chunk(self, chunk: bytes) -> None:
        """Send one piece of a started stream. A piece that ends with the SSE terminator ``data: [DONE]``
        completes the stream for the client: a client that closes right after it (most SDKs and load generators
        do) has lost nothing, so its disconnect is not counted as an abort."""
        if chunk.endswith(_SSE_DONE):
            self._done = True
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def abort_stream(self, event: bytes, timeout_s: float = 1.0) -> None:
        """End a started stream with ``event`` (an SSE error event), giving up after ``timeout_s`` if the
        client does not read (uvicorn then closes the connection when the app returns)."""
        if self._done:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.send_chunk(event)
                await self.end()
        except TimeoutError:
            pass

    async def end(self) -> None:
        self._done = True
        await self._send({"type": "http.response.body", "body": b""})


async def read_limited(parts: AsyncIterator[bytes], declared: str | None, max_bytes: int) -> bytes:
    """A request body of at most ``max_bytes``: 413 before reading when the Content-Length (``declared``)
    says more, else as soon as the parts read add up to more."""
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for part in parts:
        if part:
            size += len(part)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(part)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_within(read: Awaitable[bytes], timeout_s: float) -> bytes:
    """Await a body read (``read_limited(...)``) for at most ``timeout_s`` seconds: past it the read is cancelled
    and :class:`OpenAIError` 408 ``body_timeout`` is raised (the client sent its body too slowly)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read
    except TimeoutError:
        raise OpenAIError(
            408, f"request body not received within {timeout_s:g}s", code="body_timeout"
        ) from None


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(413, f"request body larger than {max_bytes} bytes", code="body_too_large")
