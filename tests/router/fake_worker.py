"""A fake OpenAI/vLLM worker for router tests: speaks the stock NIXL PD protocol, records what it received.

Behaviour knobs (attributes of :class:`FakeWorker`, changeable during a test): ``max_model_len`` (prompts
longer than that in "tokens" = words get vLLM's 400), ``fail_status`` (answer every request with that status),
``die_after_chunks`` (break a stream abruptly after that many chunks), ``chunk_delay_s``, ``delay_s`` (wait
before answering; like vLLM, a client disconnect during that wait aborts the request and counts in
``cancelled``), ``health_status``, ``tokenize_status``. ``POST /tokenize`` gives one token id per word (roles
count as words for messages), like vLLM's endpoint shape; ``tokenize_calls`` counts calls. ``POST /v1/responses``
(a passthrough route) honours ``delay_s`` and, streamed, sends ``tokens`` delta events ``chunk_delay_s`` apart
(a stream cut short counts in ``cancelled``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from hashlib import blake2b

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class FakeWorker:
    def __init__(self, name: str, tokens: int = 5) -> None:
        self.name = name
        self.tokens = tokens
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.max_model_len = 64
        self.fail_status: int | None = None
        self.die_after_chunks: int | None = None
        self.chunk_delay_s = 0.0
        self.cancelled = 0
        self.delay_s = 0.0
        self.health_status = 200
        self.tokenize_status = 200
        self.tokenize_calls = 0
        self.fail_prompt: str | None = None  # a completion with exactly this prompt gets a 400
        self.tag_samples = False  # completions: start each sample's text with "<prompt>#<sample>: "
        self.app = self._build()

    @staticmethod
    def token_ids(body: dict) -> list[int]:
        if "messages" in body:
            words = [
                w
                for m in body["messages"]
                for w in (f"<{m.get('role')}>", *str(m.get("content", "")).split())
            ]
        else:
            words = str(body.get("prompt", "")).split()
        return [int.from_bytes(blake2b(w.encode(), digest_size=2).digest(), "little") for w in words]

    async def _wait_or_abort(self, request: Request, seconds: float) -> bool:
        """Sleep ``seconds`` unless the client disconnects first (then count it and return False)."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        sleeper = asyncio.ensure_future(asyncio.sleep(seconds))
        watcher = asyncio.ensure_future(disconnected())
        done, _ = await asyncio.wait({sleeper, watcher}, return_when=asyncio.FIRST_COMPLETED)
        for t in (sleeper, watcher):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if watcher in done:
            self.cancelled += 1
            return False
        return True

    def _prompt_len(self, body: dict) -> int:
        if "messages" in body:
            return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        p = body.get("prompt")
        return len(p) if isinstance(p, list) else len(str(p).split())

    def _build(self) -> FastAPI:
        app = FastAPI()
        me = self

        async def handle(request: Request, chat: bool):
            body = await request.json()
            me.requests.append(body)
            me.headers.append(dict(request.headers))
            if me.delay_s and not await me._wait_or_abort(request, me.delay_s):
                return JSONResponse({"error": {"message": "aborted"}}, 499)
            if me.fail_status:
                return JSONResponse(
                    {"error": {"message": "boom", "type": "InternalServerError"}}, me.fail_status
                )
            if me._prompt_len(body) > me.max_model_len:
                return JSONResponse(
                    {
                        "error": {
                            "message": "prompt too long for max_model_len",
                            "type": "BadRequestError",
                            "code": 400,
                        }
                    },
                    400,
                )
            params = body.get("kv_transfer_params") or {}
            if params.get("do_remote_decode"):
                out = {
                    "id": "p",
                    "choices": [{"index": 0, "text": "x"}],
                    "usage": {"prompt_tokens": me._prompt_len(body), "completion_tokens": 1},
                    "kv_transfer_params": {
                        "remote_engine_id": me.name,
                        "remote_block_ids": [1, 2],
                        "remote_host": "127.0.0.1",
                        "remote_port": 1,
                        "do_remote_prefill": True,
                        "do_remote_decode": False,
                    },
                }
                return JSONResponse(out)
            if me.fail_prompt is not None and body.get("prompt") == me.fail_prompt:
                return JSONResponse({"error": {"message": "bad prompt", "type": "BadRequestError"}}, 400)
            n = body.get("max_tokens") or me.tokens
            samples = body.get("n") or 1
            # completions: each sample's text starts with "<prompt>#<sample>:" so merged answers can be checked
            tag = f"{body.get('prompt')}#" if me.tag_samples and not chat else ""
            usage = {"prompt_tokens": me._prompt_len(body), "completion_tokens": n * samples}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if not body.get("stream"):

                def choice(j: int) -> dict:
                    text = f"{tag}{j}: " * bool(tag) + " ".join(f"t{i}" for i in range(n))
                    if chat:
                        return {"index": j, "message": {"role": "assistant", "content": text}}
                    return {"index": j, "text": text}

                return JSONResponse(
                    {
                        "id": "d",
                        "object": "x",
                        "model": body["model"],
                        "worker": me.name,
                        "choices": [choice(j) for j in range(samples)],
                        "usage": usage,
                    }
                )
            include_usage = (body.get("stream_options") or {}).get("include_usage")

            async def gen():
                try:
                    for i in range(n):
                        if me.die_after_chunks is not None and i >= me.die_after_chunks:
                            raise RuntimeError("fake worker crash")
                        for j in range(samples):
                            text = (f"{tag}{j}: " if tag and i == 0 else "") + f"t{i} "
                            delta = {"delta": {"content": text}} if chat else {"text": text}
                            event = {"id": "d", "object": "x", "choices": [{"index": j, **delta}]}
                            yield f"data: {json.dumps(event)}\n\n".encode()
                        if me.chunk_delay_s:
                            await asyncio.sleep(me.chunk_delay_s)
                    if include_usage:
                        yield f"data: {json.dumps({'id': 'd', 'choices': [], 'usage': usage})}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                except asyncio.CancelledError:
                    me.cancelled += 1
                    raise
                except GeneratorExit:
                    me.cancelled += 1
                    raise

            return StreamingResponse(gen(), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await handle(request, chat=True)

        @app.get("/health")
        async def health():
            return JSONResponse({"ok": me.health_status == 200, "t": time.time()}, me.health_status)

        @app.get("/metrics")
        async def metrics():
            return JSONResponse({})

        @app.post("/detokenize")
        async def detokenize(request: Request):
            body = await request.json()
            me.requests.append(body)
            return {"prompt": " ".join(f"w{t}" for t in body.get("tokens", []))}

        @app.post("/v1/embeddings")
        async def embeddings(request: Request):
            me.requests.append(await request.json())
            return JSONResponse(
                {
                    "error": {
                        "message": "The model does not support Embeddings API",
                        "type": "BadRequestError",
                    }
                },
                400,
            )

        @app.post("/v1/responses")
        async def responses(request: Request):
            body = await request.json()
            me.requests.append(body)
            if me.delay_s and not await me._wait_or_abort(request, me.delay_s):
                return JSONResponse({"error": {"message": "aborted"}}, 499)
            if not body.get("stream"):
                return {"id": "resp", "object": "response", "worker": me.name, "output_text": "ok"}

            async def events():
                try:
                    yield b'event: response.created\ndata: {"type": "response.created"}\n\n'
                    for i in range(me.tokens):
                        if me.chunk_delay_s:
                            await asyncio.sleep(me.chunk_delay_s)
                        delta = {"type": "response.output_text.delta", "delta": f"t{i} "}
                        yield f"event: response.output_text.delta\ndata: {json.dumps(delta)}\n\n".encode()
                    yield b'event: response.completed\ndata: {"type": "response.completed"}\n\n'
                except (asyncio.CancelledError, GeneratorExit):
                    me.cancelled += 1
                    raise

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.get("/version")
        async def version():
            return {"version": "0.0-fake"}

        @app.post("/tokenize")
        async def tokenize(request: Request):
            me.tokenize_calls += 1
            if me.tokenize_status != 200:
                return JSONResponse({"error": {"message": "no tokenizer"}}, me.tokenize_status)
            tokens = me.token_ids(await request.json())
            return {"tokens": tokens, "count": len(tokens), "max_model_len": 4096}

        return app
