"""HTTP/1.1 keep-alive client for the router's legs: httptools' parser on asyncio protocols.

Why not aiohttp/httpx: a leg is a POST of a small JSON body to a worker and the read of its reply; on the
router's hot path aiohttp spent ~150 us of CPU per call here and this client ~40 us (measured against the same
raw worker, docs/router.md), and every request runs two legs. The HTTP parsing is httptools (llhttp, the parser
uvicorn uses); this module only owns connections, the pool and timeouts.

Contract:
- :meth:`LegClient.post` returns once the status line and headers arrived; the body is read with
  :meth:`LegResponse.read` (whole body) or :meth:`LegResponse.chunks` (as it arrives). Every wait (connect,
  headers, each body piece) is bounded: ``connect_timeout_s`` for the connection, ``read_timeout_s`` between
  two pieces of the response, and optionally an absolute ``deadline`` (event-loop time) that raises
  :class:`LegDeadline`.
- A :class:`LegResponse` owns its connection until :meth:`LegResponse.release` (back to the pool when the body
  was read to the end and the worker allows keep-alive, otherwise closed) or :meth:`LegResponse.close`; both
  are idempotent. Closing a connection mid-response is how a leg is aborted (vLLM aborts the request).
- Errors are :class:`LegError` subclasses: :class:`LegConnectError` (nothing reached the worker; ``refused``
  tells a refused/unreachable address from a connect timeout), :class:`LegTimeout`,
  :class:`LegDisconnected` (the connection broke or the reply was not HTTP).
- A pooled connection that the worker closed while idle is detected before use or, if the close races with
  the request, retried once on a new connection (nothing of the reply had arrived). Idle connections are
  retired after ``keepalive_s``, below the workers' own keep-alive, so that race is rare; a worker that read
  the request and then dropped the connection without a byte of reply may see it twice.
- Interim (1xx) replies are skipped; bytes after the end of a reply make the connection unusable.
- Flow control: reading from the socket pauses while more than ``_HIGH_WATER`` bytes wait for the consumer.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator

import httptools

from pdmesh.router.errors import RouterError
from pdmesh.router.leg_target import BadTarget, Target, parse_target

_HIGH_WATER = 1 << 20
_MAX_BODY = 256 << 20  # a non-streamed reply larger than this is refused (a worker gone wrong)


class LegError(RouterError):
    """A leg failed at the connection or protocol level (never a worker's HTTP error status)."""


class LegConnectError(LegError):
    """No connection to the worker; ``refused`` is True for refused/unreachable, False for a timeout."""

    def __init__(self, message: str, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class LegTimeout(LegError):
    """The worker sent nothing for ``read_timeout_s``."""


class LegDeadline(LegError):
    """The caller's absolute deadline passed while waiting for the worker."""


class LegDisconnected(LegError):
    """The connection broke before the reply was complete, or the reply was not valid HTTP."""


class _AfterReply(Exception):
    """Raised inside the parser when bytes follow a complete reply."""


class _Conn(asyncio.Protocol):
    """One TCP connection; parses replies and buffers body pieces for the current :class:`LegResponse`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.interim = False
        self.complete = False
        self.got_bytes = False
        self.framed = False  # content-length or chunked: the end of the body is known without a close
        self.keep_alive = True
        self.error: LegError | None = None
        self.buffered: collections.deque[bytes] = collections.deque()
        self.buffered_bytes = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.active = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active or self.complete:
            # Bytes on an idle pooled connection or after the end of the reply: the worker broke protocol.
            self.keep_alive = False
            if not self.active:
                self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            if not self.complete:  # after a complete reply, garbage only spoils the connection
                self.error = LegDisconnected(f"invalid HTTP reply: {e}")
            self.keep_alive = False
            self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.active and not self.complete and self.error is None:
            if self.headers_done and not self.framed and exc is None:
                self.complete = True  # body delimited by a clean close (a reset is a truncation)
            else:
                self.error = LegDisconnected(f"worker closed the connection ({exc or 'EOF'})")
        self._wake()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # a second reply in the same read: the worker broke protocol
            raise _AfterReply()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim reply (100 Continue, 103 Early Hints): the real one follows
            self.headers = []
            self.interim = True
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        for name, value in self.headers:
            if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
                self.framed = True

    def on_body(self, body: bytes) -> None:
        self.buffered.append(body)
        self.buffered_bytes += len(body)
        if self.buffered_bytes > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self.idle_since = time.monotonic()  # the worker's keep-alive clock starts at the end of its reply

    # -- helpers
    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def take(self) -> bytes:
        """All buffered body bytes (resumes reading if it was paused)."""
        data = b"".join(self.buffered) if len(self.buffered) != 1 else self.buffered[0]
        self.buffered.clear()
        self.buffered_bytes = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def wait(self, timeout: float, deadline: float | None) -> None:
        """Wait for the next parser event. Raises LegTimeout/LegDeadline; the caller then closes."""
        now = self.loop.time()
        limit, deadline_bound = now + timeout, False
        if deadline is not None and deadline < limit:
            limit, deadline_bound = deadline, True
        if limit <= now:
            raise LegDeadline("deadline passed") if deadline_bound else LegTimeout("read timeout")
        fut = self.waiter = self.loop.create_future()
        handle = self.loop.call_at(limit, _expire, fut)
        try:
            await fut
        except TimeoutError:
            if deadline_bound:
                raise LegDeadline("deadline passed") from None
            raise LegTimeout(f"worker sent nothing for {timeout:g}s") from None
        finally:
            handle.cancel()
            self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class LegResponse:
    """A worker's reply whose status and headers arrived; owns the connection until release/close."""

    def __init__(self, client: LegClient, key: tuple[str, int, bool], conn: _Conn) -> None:
        self._client = client
        self._key = key
        self._conn: _Conn | None = conn
        self.status = conn.status
        self.headers = conn.headers

    async def read(self, deadline: float | None = None) -> bytes:
        """The whole body. Raises LegError (the connection is closed then)."""
        parts: list[bytes] = []
        size = 0
        async for part in self.chunks(deadline):
            size += len(part)
            if size > _MAX_BODY:
                self.close()
                raise LegDisconnected(f"reply larger than {_MAX_BODY} bytes")
            parts.append(part)
        return b"".join(parts)

    async def chunks(self, deadline: float | None = None) -> AsyncIterator[bytes]:
        """Body pieces as they arrive (coalesced when several are buffered); ends at the end of the body.

        Raises LegError; on any error, or if the consumer stops early, the connection is closed (not pooled).
        """
        conn = self._conn
        if conn is None:
            raise LegDisconnected("response already released")
        timeout = self._client.read_timeout_s
        try:
            while True:
                if conn.buffered:
                    yield conn.take()
                    continue
                if conn.error is not None:
                    raise conn.error
                if conn.complete:
                    return
                await conn.wait(timeout, deadline)
        except BaseException:
            self.close()
            raise

    @property
    def complete(self) -> bool:
        c = self._conn
        return c is not None and c.complete and not c.buffered

    def release(self) -> None:
        """Give the connection back to the pool if the body was read to the end, else close it."""
        reusable = (
            self.complete and self._conn.error is None and self._conn.keep_alive and not self._conn.closed
        )
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if reusable:
            self._client._put(self._key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Close the connection (aborts the request on the worker if the reply was not complete)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class LegClient:
    """Keep-alive connection pool per worker address. Not thread-safe: one instance per event loop.

    Worker URLs may carry a path prefix (``http://gateway/worker-1``: legs go to ``/worker-1/v1/...``) and may
    be ``https`` (verified with ``ssl_context``, else the system's CA store). ``close()`` closes idle connections; connections
    held by live :class:`LegResponse` objects are closed by their owners.
    """

    def __init__(
        self,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_s: float = 4.0,
        max_idle_per_worker: int = 512,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``keepalive_s`` must stay below the workers' own idle keep-alive (uvicorn/vLLM: 5 s), so that the
        router, not the worker, retires idle connections (a worker closing one as a request goes out on it is
        the race :meth:`post` retries). ``ssl_context`` verifies https workers (default: the system's CAs)."""
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self.max_idle_per_worker = max_idle_per_worker
        self._idle: dict[tuple[str, int, bool], list[_Conn]] = {}
        self._targets: dict[str, Target] = {}
        self._ssl = ssl_context  # for https workers; the system's CA store when None

    def _target(self, base_url: str) -> Target:
        target = self._targets.get(base_url)
        if target is None:
            try:
                target = parse_target(base_url)
            except BadTarget as e:
                raise LegConnectError(str(e), refused=True) from None
            if len(self._targets) > 4096:
                self._targets.clear()
            self._targets[base_url] = target
        return target

    def _put(self, key: tuple[str, int, bool], conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle_per_worker:
            conn.close()
            return
        conn._reset()
        idle.append(conn)

    def _get_idle(self, key: tuple[str, int, bool]) -> _Conn | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest_ok = time.monotonic() - self.keepalive_s
        while idle:
            conn = idle.pop()  # LIFO: the most recently used connection is the most likely alive
            if not conn.closed and conn.idle_since >= oldest_ok:
                return conn
            conn.close()
        return None

    async def _connect(self, t: Target, loop: asyncio.AbstractEventLoop) -> _Conn:
        host, port = t.host, t.port
        tls: dict = {}
        if t.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = {"ssl": self._ssl, "server_hostname": host}
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Conn(loop), host, port, **tls)
        except TimeoutError:
            raise LegConnectError(
                f"connect to {host}:{port} timed out after {self.connect_timeout_s:g}s", refused=False
            ) from None
        except OSError as e:
            raise LegConnectError(f"cannot connect to {host}:{port}: {e}", refused=True) from None
        return conn

    async def post(
        self,
        base_url: str,
        path: str,
        body: bytes,
        headers: bytes = b"",
        deadline: float | None = None,
    ) -> LegResponse:
        """POST ``body`` (JSON) and wait for the reply's status and headers.

        ``headers`` are extra raw header lines, each ending in CRLF. Raises LegError (no connection left open).
        """
        t = self._target(base_url)
        key = t.key
        loop = asyncio.get_running_loop()
        head = (
            b"POST %s%s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (t.prefix, path.encode(), t.netloc, len(body), headers)
        )
        for attempt in range(2):
            conn = self._get_idle(key) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(t, loop)
            conn.active = True
            try:
                assert conn.transport is not None
                conn.transport.write(head + body)
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self.read_timeout_s, deadline)
            except LegDisconnected:
                conn.close()
                if reused and not conn.got_bytes:
                    continue  # the worker closed the idle connection as we sent: it never saw the request
                raise
            except BaseException:
                conn.close()
                raise
            return LegResponse(self, key, conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
