"""Batched completion prompts: one routed request per prompt, merged into the one response vLLM gives.

A ``/v1/completions`` body whose ``prompt`` holds several prompts is split
(:func:`router.openai_requests.batched_prompts`); each part is routed as a request of its own (cache-aware
choice, PD legs, retries before the first byte), at most ``parallel`` parts at a time. The answers are merged
as one vLLM engine answers a batch:

- choices in prompt order, ``index`` = prompt position * ``n`` + the sample's own index; one ``id``;
  ``usage`` summed over the parts;
- not streamed: all parts must succeed; the first failure fails the request with that part's error (the other
  parts are cancelled, which aborts them on their workers): never a partial body;
- streamed: every part's response has started (status 200) before the client sees a byte, so a part refused
  before its first token fails the request the same way; chunks are relayed as they arrive with ``index`` and
  ``id`` rewritten; the parts' usage chunks are held back and summed into one final usage chunk, then one
  ``data: [DONE]``. A part that breaks mid-stream ends the response with its error event.

``parallel`` bounds how many parts are being routed (legs in progress) at a time; a streamed batch then
generates all its parts together, as one engine given the batch would.

Ownership: every part's upstream response is closed by :func:`gather_parts` (on failure), by its relay, or by
the caller (``LegResult.close`` is idempotent); cancellation (client gone, deadline) closes them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from pdmesh.router.errors import OpenAIError, sse_error_event
from pdmesh.router.upstream import LegResult

T = TypeVar("T")
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


async def gather_parts(
    parts: Sequence[dict], route: Callable[[dict], Awaitable[LegResult]], parallel: int
) -> list[LegResult]:
    """Route every part (at most ``parallel`` at once); their results in order. On the first failure the other
    parts are cancelled, every result obtained so far is closed, and that failure is raised."""
    gate = asyncio.Semaphore(parallel)

    async def one(body: dict) -> LegResult:
        async with gate:
            return await route(body)

    tasks = [asyncio.ensure_future(one(p)) for p in parts]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception()), None)
        if failed is None:
            return [t.result() for t in tasks]
        raise failed.exception()  # type: ignore[misc]
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is None:
                await t.result().close()
        raise


def merge_responses(bodies: Sequence[dict], n: int, response_id: str) -> dict:
    """One completion response from the parts' responses (each a complete vLLM completion body)."""
    merged = {k: v for k, v in bodies[0].items() if k not in ("choices", "usage", "kv_transfer_params")}
    merged["id"] = response_id
    choices = []
    usage = dict.fromkeys(USAGE_FIELDS, 0)
    for position, body in enumerate(bodies):
        for choice in body.get("choices") or []:
            choices.append({**choice, "index": position * n + int(choice.get("index") or 0)})
        for k in USAGE_FIELDS:
            usage[k] += int((body.get("usage") or {}).get(k) or 0)
    merged["choices"] = choices
    merged["usage"] = usage
    return merged


class StreamMerger:
    """Rewrites the parts' SSE events into one stream (see the module docstring). Feed each part's bytes with
    :meth:`feed`; it returns the events to send now. :meth:`finish` returns the closing usage chunk and ``[DONE]``;
    :attr:`failed` is set once a part sent an error event (the caller ends the stream after sending it)."""

    def __init__(self, parts: int, n: int, response_id: str, include_usage: bool) -> None:
        self.n, self.id, self.include_usage = n, response_id, include_usage
        self._buffers = [b""] * parts
        self._usage = dict.fromkeys(USAGE_FIELDS, 0)
        self._template: dict | None = None
        self.failed = False

    def feed(self, position: int, data: bytes) -> list[bytes]:
        buf = self._buffers[position] + data.replace(b"\r\n", b"\n")
        *events, self._buffers[position] = buf.split(b"\n\n")
        out = []
        for event in events:
            rewritten = self._event(position, event)
            if rewritten is not None:
                out.append(rewritten)
        return out

    def _event(self, position: int, event: bytes) -> bytes | None:
        lines = [ln for ln in event.split(b"\n") if ln.startswith(b"data:")]
        if not lines:
            return None
        payload = lines[0][5:].strip()
        if payload == b"[DONE]":
            return None
        try:
            chunk = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(chunk, dict):
            return None
        if "error" in chunk:
            self.failed = True
            return b"data: " + payload + b"\n\n"
        choices = chunk.get("choices") or []
        if self._template is None:
            self._template = {k: chunk[k] for k in ("object", "created", "model") if k in chunk}
        usage = chunk.get("usage")
        if not choices:
            if isinstance(usage, dict):  # a part's final usage chunk: summed into ours
                for k in USAGE_FIELDS:
                    self._usage[k] += int(usage.get(k) or 0)
            return None
        for c in choices:
            c["index"] = position * self.n + int(c.get("index") or 0)
        chunk["id"] = self.id
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def finish(self) -> list[bytes]:
        out = []
        if self.include_usage:
            chunk = {"id": self.id, **(self._template or {}), "choices": [], "usage": self._usage}
            out.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        return out


async def merged_stream(
    results: Sequence[LegResult],
    relay: Callable[[LegResult], AsyncIterator[bytes]],
    merger: StreamMerger,
) -> AsyncIterator[bytes]:
    """The parts' streams interleaved as they arrive, rewritten by ``merger``. Every part's relay is run to its
    end or closed (cancellation included)."""
    queue: asyncio.Queue[tuple[int, bytes | None]] = asyncio.Queue(maxsize=64)

    async def pump(position: int, result: LegResult) -> None:
        # The end marker is sent only by a pump that ran to its end: a cancelled one (the consumer is gone) must
        # not block on a full queue nobody reads any more.
        try:
            async with contextlib.aclosing(relay(result)) as chunks:
                async for data in chunks:
                    await queue.put((position, data))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a relay that broke unexpectedly ends the merged stream with an error event
            err = OpenAIError(
                502, f"a part of the batch failed: {type(e).__name__}", code="PD_PEER_UNAVAILABLE"
            )
            await queue.put((position, sse_error_event(err)))
        await queue.put((position, None))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(results)]
    try:
        open_parts = len(tasks)
        while open_parts:
            position, data = await queue.get()
            if data is None:
                open_parts -= 1
                continue
            for event in merger.feed(position, data):
                yield event
            if merger.failed:
                return
        for event in merger.finish():
            yield event
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            await r.close()
