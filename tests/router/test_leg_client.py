"""The legs' HTTP client against raw asyncio servers on 127.0.0.1: pooling, framing, timeouts, failures."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from pdmesh.router.leg_client import LegClient, LegConnectError, LegDeadline, LegDisconnected, LegTimeout
from tests.servers import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """An asyncio TCP server that counts connections and runs ``handler`` on each."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_peer = asyncio.Event()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawServer:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


async def read_request(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await r.readexactly(length)


def reply(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def echo_forever(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while True:
        _, body = await read_request(r)
        w.write(reply(body))
        await w.drain()


async def round_trip(client: LegClient, url: str, payload: bytes, path: str = "/x") -> bytes:
    """POST ``payload``, read the whole reply, give the connection back; returns the body."""
    resp = await client.post(url, path, payload)
    assert resp.status == 200
    body = await resp.read()
    resp.release()
    return body


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_keep_alive_reuses_one_connection_and_sends_headers() -> None:
    seen: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(r)
            seen.append(head)
            w.write(reply(body))

    async def main() -> None:
        async with RawServer(handler) as srv:
            client = LegClient(2, 5)
            for i in range(5):
                resp = await client.post(
                    srv.url, "/v1/completions", b'{"i": %d}' % i, b"X-Request-Id: r%d\r\n" % i
                )
                assert resp.status == 200
                assert await resp.read() == b'{"i": %d}' % i
                resp.release()
            assert srv.connections == 1
            assert seen[0].startswith(b"POST /v1/completions HTTP/1.1\r\n")
            assert b"\r\nX-Request-Id: r4\r\n" in seen[4]
            assert f"\r\nHost: 127.0.0.1:{srv.port}\r\n".encode() in seen[0]
            client.close()

    run(main())


def test_unread_or_closed_response_is_not_pooled() -> None:
    async def main() -> None:
        async with RawServer(echo_forever) as srv:
            client = LegClient(2, 5)
            resp = await client.post(srv.url, "/x", b"a")
            resp.release()  # body not read: the connection cannot be reused
            resp2 = await client.post(srv.url, "/x", b"b")
            assert await resp2.read() == b"b"
            resp2.release()
            assert srv.connections == 2
            client.close()

    run(main())


def test_connection_close_reply_is_not_pooled() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _, body = await read_request(r)
        w.write(reply(body, b"connection: close\r\n"))
        await w.drain()

    async def main() -> None:
        async with RawServer(handler) as srv:
            client = LegClient(2, 5)
            for payload in (b"1", b"2"):
                assert await round_trip(client, srv.url, payload) == payload
            assert srv.connections == 2
            client.close()

    run(main())


def test_idle_connection_closed_by_worker_is_replaced() -> None:
    async def one_then_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _, body = await read_request(r)
        w.write(reply(body))  # keep-alive reply, then the worker drops the connection
        await w.drain()

    async def main() -> None:
        async with RawServer(one_then_close) as srv:
            client = LegClient(2, 5)
            for payload in (b"first", b"second", b"third"):
                assert await round_trip(client, srv.url, payload) == payload
                await asyncio.sleep(0.05)  # let the close arrive (or not: either way the next post works)
            assert srv.connections == 3
            client.close()

    run(main())


def test_chunked_stream_arrives_in_pieces_and_early_close_aborts() -> None:
    release = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            w.write(b"5\r\nhello\r\n")
            await w.drain()
            await release.wait()
            w.write(b"6\r\n world\r\n0\r\n\r\n")
            await w.drain()

    async def main() -> None:
        async with RawServer(handler) as srv:
            client = LegClient(2, 5)
            resp = await client.post(srv.url, "/x", b"{}")
            pieces = resp.chunks()
            assert await anext(pieces) == b"hello"
            release.set()
            assert await anext(pieces) == b" world"
            with pytest.raises(StopAsyncIteration):
                await anext(pieces)
            assert resp.complete
            resp.release()
            release.clear()
            resp = await client.post(srv.url, "/x", b"{}")
            assert srv.connections == 1  # the complete stream's connection was reused
            pieces = resp.chunks()
            assert await anext(pieces) == b"hello"
            assert not resp.complete
            resp.release()  # incomplete: closes, which is how a leg is aborted
            await pieces.aclose()
            release.set()
            resp = await client.post(srv.url, "/x", b"{}")
            assert await resp.read() == b"hello world"
            assert srv.connections == 2  # the aborted connection was not reused
            client.close()

    run(main())


def test_body_delimited_by_close_and_large_body_with_flow_control() -> None:
    big = bytes(range(256)) * (6 * 4096)  # 6 MiB: several times the high-water mark

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\r\n")
        for i in range(0, len(big), 65536):
            w.write(big[i : i + 65536])
            await w.drain()
        w.close()

    async def main() -> None:
        async with RawServer(handler) as srv:
            client = LegClient(2, 5)
            resp = await client.post(srv.url, "/x", b"{}")
            await asyncio.sleep(0.2)  # let the worker fill the buffer past the high-water mark
            assert await resp.read() == big
            resp.release()
            client.close()

    run(main())


def test_refused_connection_is_a_hard_connect_error() -> None:
    async def main() -> None:
        client = LegClient(2, 5)
        with pytest.raises(LegConnectError) as e:
            await client.post(f"http://127.0.0.1:{free_port()}", "/x", b"{}")
        assert e.value.refused

    run(main())


def test_read_timeout_and_deadline_are_told_apart() -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await asyncio.sleep(10)

    async def main() -> None:
        async with RawServer(silent) as srv:
            client = LegClient(2, 0.3)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(LegTimeout):
                await client.post(srv.url, "/x", b"{}")
            assert loop.time() - t0 < 2
            client2 = LegClient(2, 30)
            t0 = loop.time()
            with pytest.raises(LegDeadline):
                await client2.post(srv.url, "/x", b"{}", deadline=loop.time() + 0.3)
            assert loop.time() - t0 < 2

    run(main())


def test_stream_stall_times_out_between_pieces() -> None:
    async def stall(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n")
        await w.drain()
        await asyncio.sleep(10)

    async def main() -> None:
        async with RawServer(stall) as srv:
            client = LegClient(2, 0.3)
            resp = await client.post(srv.url, "/x", b"{}")
            pieces = resp.chunks()
            assert await anext(pieces) == b"ok"
            with pytest.raises(LegTimeout):
                await anext(pieces)

    run(main())


@pytest.mark.parametrize(
    "answer",
    [b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"],
    ids=["garbage", "truncated"],
)
def test_broken_replies_are_disconnect_errors(answer: bytes) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(answer)
        await w.drain()

    async def main() -> None:
        async with RawServer(handler) as srv:
            client = LegClient(2, 5)
            with pytest.raises(LegDisconnected):
                resp = await client.post(srv.url, "/x", b"{}")
                await resp.read()

    run(main())


def test_unsupported_url_is_refused() -> None:
    async def main() -> None:
        with pytest.raises(LegConnectError):
            await LegClient(2, 5).post("https://example.invalid", "/x", b"{}")

    run(main())


def test_interim_reply_is_skipped_and_bytes_after_the_reply_spoil_the_connection() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(r)
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + reply(body) + b"GARBAGE")
            await w.drain()

    async def main() -> None:
        async with RawServer(handler) as srv:
            client = LegClient(2, 5)
            for payload in (b"one", b"two"):
                resp = await client.post(srv.url, "/x", payload)
                assert resp.status == 200
                assert await resp.read() == payload
                await asyncio.sleep(0.05)  # the trailing garbage arrives
                resp.release()
            assert srv.connections == 2  # the spoiled connection was not reused
            client.close()

    run(main())


def test_reset_during_close_delimited_body_is_an_error_not_a_short_body() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b'HTTP/1.1 200 OK\r\n\r\n{"partial": ')
        await w.drain()
        await asyncio.sleep(0.1)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()  # with linger 0: RST, not a clean close

    async def main() -> None:
        async with RawServer(handler) as srv:
            client = LegClient(2, 5)
            resp = await client.post(srv.url, "/x", b"{}")
            with pytest.raises(LegDisconnected):
                await resp.read()

    run(main())


def test_worker_url_with_path_prefix_and_bad_urls() -> None:
    seen: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head, body = await read_request(r)
        seen.append(head.split(b"\r\n")[0])
        w.write(reply(body))
        await w.drain()

    async def main() -> None:
        async with RawServer(handler) as srv:
            client = LegClient(2, 5)
            resp = await client.post(srv.url + "/gw/worker-1/", "/v1/completions", b"{}")
            assert await resp.read() == b"{}"
            resp.release()
            assert seen == [b"POST /gw/worker-1/v1/completions HTTP/1.1"]
            for bad in (
                "http://127.0.0.1:99999",
                "http://[::1",
                "ftp://x",
                "http://h/p?q=1",
                "http://u:pw@h:1",
                "http://h/a b",
            ):
                with pytest.raises(LegConnectError):
                    await client.post(bad, "/x", b"{}")
            client.close()

    run(main())


def test_https_worker(tls_cert) -> None:
    import ssl

    cert, key = tls_cert
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        port = free_port()
        server = await asyncio.start_server(
            lambda r, w: echo_forever(r, w), "127.0.0.1", port, ssl=server_ctx
        )
        try:
            client = LegClient(2, 5, ssl_context=client_ctx)
            for payload in (b"a", b"b"):
                resp = await client.post(f"https://localhost:{port}", "/x", payload)
                assert await resp.read() == payload
                resp.release()
            untrusted = LegClient(2, 5)  # the system's CAs do not know the test certificate
            with pytest.raises(LegConnectError):
                await untrusted.post(f"https://localhost:{port}", "/x", b"c")
            client.close()
        finally:
            server.close()

    run(main())


def test_second_reply_in_the_same_read_is_not_taken_for_the_next_request() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(r)
            w.write(reply(body) + b"HTTP/1.1 500 X\r\ncontent-length: 3\r\n\r\nbad")  # one segment
            await w.drain()

    async def main() -> None:
        async with RawServer(handler) as srv:
            client = LegClient(2, 5)
            for payload in (b"one", b"two"):
                assert await round_trip(client, srv.url, payload) == payload
            assert srv.connections == 2  # the connection with the stray reply was dropped, not reused
            client.close()

    run(main())
