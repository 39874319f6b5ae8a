"""The client exchange's disconnect rules: a disconnect before the stream is complete is an abort, one after the
SSE terminator is not (the client has the whole answer)."""

from __future__ import annotations

import asyncio

import pytest

from pdmesh.router.exchange import ClientGone, Exchange


def _exchange(disconnect: asyncio.Event) -> tuple[Exchange, list[dict]]:
    sent: list[dict] = []

    async def receive() -> dict:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    return Exchange({"type": "http", "headers": []}, receive, send), sent


async def _stream(ex: Exchange, disconnect: asyncio.Event, pieces: list[bytes]) -> str:
    await ex.start_stream([])
    for piece in pieces:
        await ex.send_chunk(piece)
    disconnect.set()  # the client closes now, while the upstream has not reached its EOF yet
    await asyncio.sleep(0.05)
    await ex.end()
    return "finished"


def test_disconnect_after_done_is_not_an_abort():
    async def main() -> str:
        disconnect = asyncio.Event()
        ex, _ = _exchange(disconnect)
        pieces = [b'data: {"choices": []}\n\n', b"data: [DONE]\n\n"]
        return await ex.watched(lambda: _stream(ex, disconnect, pieces))

    assert asyncio.run(main()) == "finished"


def test_disconnect_mid_stream_is_an_abort():
    async def main() -> str:
        disconnect = asyncio.Event()
        ex, _ = _exchange(disconnect)
        return await ex.watched(lambda: _stream(ex, disconnect, [b'data: {"choices": []}\n\n']))

    with pytest.raises(ClientGone):
        asyncio.run(main())
