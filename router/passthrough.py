"""Routes the router passes through to one worker, unchanged: the rest of the OpenAI/vLLM surface.

``POST`` :data:`PASSTHROUGH_ROUTES` (``/tokenize``, ``/detokenize``, ``/v1/embeddings``, ``/pooling``,
``/classify``, ``/score``, ``/rerank``, ``/v1/responses``, ...) go to one worker serving the body's ``model``
(the only model when the body names none): a decode worker, else a prefill worker; the less loaded of two
(power of two); retried on another worker before the first byte like the legs (:class:`router.upstream.Upstream`).
Nothing is disaggregated: the worker computes what it needs. A worker's 4xx is relayed as is (e.g. a generative
model asked for embeddings answers what it cannot do); a streamed answer (``"stream": true``) is relayed as it
comes. ``GET /version`` answers the workers' vLLM version and pdmesh's.

Client-supplied internal fields (``kv_transfer_params``) are dropped as on the completion routes; the API key
and admission limits apply; bodies are bounded by ``max_body_bytes``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdmesh.router.auth import api_key_of, check_api_key
from pdmesh.router.errors import OpenAIError
from pdmesh.router.exchange import read_limited
from pdmesh.router.openai_requests import json_object
from pdmesh.router.policies import PowerOfTwo
from pdmesh.router.route_context import RouteContext

if TYPE_CHECKING:
    from pdmesh.router.state import RouterState

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
        check_api_key(request, config.api_keys)
        permit = None
        if st.limiter.enabled:
            permit = st.limiter.admit(api_key_of(request.headers.get("authorization"), config.api_keys))
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
    stream): the worker's response with its in-flight count, and the admission permit."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **kw) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def _forward(
    st: RouterState, request: Request, policy: PowerOfTwo, release: Callable[[], None]
) -> Response:
    path = request.url.path
    raw = await read_limited(
        request.stream(), request.headers.get("content-length"), st.config.max_body_bytes
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
    st.metrics.requests.labels(path, str(result.status)).inc()
    if not stream:
        return Response(result.content, status_code=result.status, media_type="application/json")

    async def relay() -> AsyncIterator[bytes]:
        async for chunk in st.upstream.relay_stream(result, None, path, done_marker=None):
            yield chunk

    async def on_close() -> None:
        await result.close()
        release()

    return _OwnedStream(relay(), on_close, status_code=result.status, media_type="text/event-stream")


def _pdmesh_version() -> str | None:
    try:
        return importlib.metadata.version("pdmesh")
    except importlib.metadata.PackageNotFoundError:
        return None
