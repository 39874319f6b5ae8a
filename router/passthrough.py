"""Routes the router passes through to one worker, unchanged: the rest of the OpenAI/vLLM surface.

``POST`` :data:`PASSTHROUGH_ROUTES` (``/tokenize``, ``/detokenize``, ``/v1/embeddings``, ``/pooling``,
``/classify``, ``/score``, ``/rerank``, ``/v1/responses``, ...) go to one worker serving the body's ``model``
(the only model when the body names none): a decode worker, else a prefill worker; the less loaded of two
(power of two); retried on another worker before the first byte like the legs (:class:`router.upstream.Upstream`).
Nothing is disaggregated: the worker computes what it needs. A worker's 4xx is relayed as is (e.g. a generative
model asked for embeddings answers what it cannot do); a streamed answer (``"stream": true``) is relayed as it
comes. ``GET /version`` answers the workers' vLLM version and pdmesh's.

Client-supplied internal fields (``kv_transfer_params``) are dropped as on the completion routes; the API key
and admission limits apply (one unit per request); bodies are bounded by ``max_body_bytes`` and must arrive within
``body_timeout_s`` (408 ``body_timeout``). The request deadline applies as on the completion routes: counted from
the end of the body, ``request_deadline_s`` bounds the worker call (504 ``PD_DEADLINE_EXCEEDED`` before the first
byte; the call is cancelled, which aborts it on the worker) and a streamed answer (past it the stream ends with a
``PD_DEADLINE_EXCEEDED`` error event; a client that stops reading is cut off at most :data:`SEND_GRACE_S` later).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdmesh.router.auth import check_api_key
from pdmesh.router.errors import OpenAIError
from pdmesh.router.exchange import read_limited, read_within
from pdmesh.router.openai_requests import json_object
from pdmesh.router.policies import PowerOfTwo
from pdmesh.router.route_context import RouteContext

if TYPE_CHECKING:
    from pdmesh.router.metrics import RouterMetrics
    from pdmesh.router.state import RouterState

log = logging.getLogger("pdmesh.router")

# A streamed answer past the request deadline ends with an error event (the relay's own deadline); a client that
# does not read it is cut off this long after the deadline.
SEND_GRACE_S = 1.0

PASSTHROUGH_ROUTES = (
    "/tokenize",
    "/detokenize",
    "/v1/embeddings",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/v1/responses",
)


def install_passthrough(app: FastAPI, state: Callable[[Request], RouterState]) -> None:
    """Add the passthrough routes to ``app``; ``state`` gives the router state of a request."""
    policy = PowerOfTwo()

    async def passthrough(request: Request) -> Response:
        st = state(request)
        config = st.config
        key = check_api_key(request, config.api_keys)
        permit = None
        if st.limiter.enabled:
            permit = st.limiter.admit(key)
        release = permit.release if permit is not None else (lambda: None)
        try:
            response = await _forward(st, request, policy, release)
        except BaseException:
            release()
            raise
        if not isinstance(response, _OwnedStream):
            release()  # a streamed answer releases it when the stream ends
        return response

    for path in PASSTHROUGH_ROUTES:
        app.add_api_route(path, passthrough, methods=["POST"], include_in_schema=False)

    @app.get("/version")
    async def version(request: Request) -> JSONResponse:
        st = state(request)
        check_api_key(request, st.config.api_keys)
        engine = None
        workers = st.registry.all()
        for w in workers[:3]:
            try:
                r = await st.analyzer.client.get(w.info.url + "/version", timeout=2.0)
                if r.status_code == 200:
                    engine = r.json().get("version")
                    break
            except Exception:
                continue
        return JSONResponse({"version": engine, "pdmesh": _pdmesh_version()})


class _OwnedStream(StreamingResponse):
    """A streamed answer that frees what it holds however it ends (done, client gone before or during the
    stream, deadline): the worker's response with its in-flight count, and the admission permit. Sending is
    bounded by ``deadline`` (event-loop time) plus :data:`SEND_GRACE_S`: a client that stops reading is cut off."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]],
        deadline: float,
        metrics: RouterMetrics,
        **kw,
    ) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close
        self._deadline = deadline
        self._metrics = metrics

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            async with asyncio.timeout_at(self._deadline + SEND_GRACE_S):
                await super().__call__(scope, receive, send)
        except TimeoutError:  # the response stays incomplete: uvicorn closes the connection
            self._metrics.stream_aborts.inc()
            log.warning("%s: stream passed the request deadline (a client that stops reading)", scope["path"])
        finally:
            await self._on_close()


async def _forward(
    st: RouterState, request: Request, policy: PowerOfTwo, release: Callable[[], None]
) -> Response:
    path = request.url.path
    config = st.config
    raw = await read_within(
        read_limited(request.stream(), request.headers.get("content-length"), config.max_body_bytes),
        config.body_timeout_s,
    )
    body = json_object(raw)
    models = st.registry.models()
    model = body.get("model")
    if model is None and len(models) == 1:
        model = next(iter(models))
    if not isinstance(model, str) or model not in models:
        if not models:
            raise OpenAIError(503, "no healthy workers are available", code="no_workers")
        raise OpenAIError(
            404 if isinstance(model, str) else 400,
            f"model {model!r} is not served; available: {', '.join(sorted(models))}",
            code="model_not_found",
            param="model",
        )
    stream = body.get("stream") is True
    role = "decode" if st.registry.candidates("decode", model) else "prefill"
    deadline = asyncio.get_running_loop().time() + config.request_deadline_s
    try:
        async with asyncio.timeout_at(deadline):
            result = await st.upstream.call(
                "passthrough",
                role,
                model,
                path,
                lambda _w: body,
                policy,
                st.request_ids.next(),
                stream,
                ctx=RouteContext(body, model),
            )
    except TimeoutError:
        st.metrics.errors.labels("PD_DEADLINE_EXCEEDED").inc()
        raise OpenAIError(504, "request deadline exceeded", code="PD_DEADLINE_EXCEEDED") from None
    st.metrics.requests.labels(path, str(result.status)).inc()
    if not stream:
        return Response(result.content, status_code=result.status, media_type="application/json")

    async def relay() -> AsyncIterator[bytes]:
        async for chunk in st.upstream.relay_stream(result, deadline, path, done_marker=None):
            yield chunk

    async def on_close() -> None:
        await result.close()
        release()

    return _OwnedStream(
        relay(), on_close, deadline, st.metrics, status_code=result.status, media_type="text/event-stream"
    )


def _pdmesh_version() -> str | None:
    try:
        return importlib.metadata.version("pdmesh")
    except importlib.metadata.PackageNotFoundError:
        return None
