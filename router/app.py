"""The router's FastAPI app: OpenAI endpoints, PD orchestration, registration, health, metrics.

Request flow (stock NIXL mode): validate -> pick prefill worker -> prefill leg (max_tokens=1, do_remote_decode)
-> pick decode worker -> decode leg with the prefill's kv_transfer_params -> relay (streamed as it arrives).
State lives in :class:`RouterState`, created per app (no module-level singletons).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.background import BackgroundTask

from router import pd_nixl, pd_push
from router.auth import check_api_key, check_cluster_token
from router.config import RouterConfig
from router.errors import OpenAIError, install_error_handlers
from router.metrics import RouterMetrics
from router.openai_requests import Kind, parse_request
from router.policies import RoundRobin
from router.registration import RegistrationReply, WorkerRegistration
from router.registry import Registry
from router.upstream import LegResult, Upstream

log = logging.getLogger("pdmesh.router")

_PATHS: dict[Kind, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RouterState:
    config: RouterConfig
    registry: Registry
    metrics: RouterMetrics
    upstream: Upstream
    prefill_policy: RoundRobin
    decode_policy: RoundRobin


def _make_client(cfg: RouterConfig) -> httpx.AsyncClient:
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s)
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=512, keepalive_expiry=30)
    return httpx.AsyncClient(timeout=timeout, limits=limits, http2=False, trust_env=False)


def create_app(config: RouterConfig) -> FastAPI:
    """Build the app. The httpx client and background expiry task live for the app's lifespan."""
    registry = Registry(config.heartbeat_ttl_s, config.failure_cooldown_s)
    metrics = RouterMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = _make_client(config)
        app.state.router = RouterState(
            config,
            registry,
            metrics,
            Upstream(client, registry, metrics, config.max_attempts),
            RoundRobin(),
            RoundRobin(),
        )
        expiry = asyncio.create_task(_expire_loop(registry, min(1.0, config.heartbeat_ttl_s / 4)))
        try:
            yield
        finally:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
            await client.aclose()

    app = FastAPI(title="pdmesh router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    def state(request: Request) -> RouterState:
        return request.app.state.router

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise OpenAIError(
                413, f"request body larger than {config.max_body_bytes} bytes", code="body_too_large"
            )
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > config.max_body_bytes:
                raise OpenAIError(
                    413, f"request body larger than {config.max_body_bytes} bytes", code="body_too_large"
                )
            chunks.append(part)
        return b"".join(chunks)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(state(request), request, "completions", read_body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(state(request), request, "chat", read_body)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        st = state(request)
        check_api_key(request, config.api_keys)
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "pdmesh",
                "max_model_len": info["max_model_len"],
            }
            for name, info in sorted(st.registry.models().items())
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        st = state(request)
        prefill = st.registry.healthy_count("prefill")
        decode = st.registry.healthy_count("decode")
        body = {"prefill_workers": prefill, "decode_workers": decode}
        if prefill and decode:
            return JSONResponse({"status": "ok", **body})
        missing = [r for r, n in (("prefill", prefill), ("decode", decode)) if not n]
        reason = "no healthy " + " and no healthy ".join(missing) + " worker registered"
        return JSONResponse({"status": "unavailable", "reason": reason, **body}, status_code=503)

    @app.get("/metrics")
    async def prom(request: Request) -> Response:
        st = state(request)
        st.metrics.workers.clear()
        counts: dict[tuple[str, str], int] = {}
        st.metrics.in_flight.clear()
        for w in st.registry.all():
            key = (w.info.role, str(st.registry.is_healthy(w)).lower())
            counts[key] = counts.get(key, 0) + 1
            st.metrics.in_flight.labels(w.id).set(w.in_flight)
        for (role, healthy), n in counts.items():
            st.metrics.workers.labels(role, healthy).set(n)
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/internal/workers")
    async def register(request: Request) -> RegistrationReply:
        st = state(request)
        check_cluster_token(request, config.cluster_token)
        try:
            info = WorkerRegistration.model_validate_json(await read_body(request))
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise OpenAIError(400, f"invalid registration: {param}: {err['msg']}", param=param) from None
        known = any(w.id == info.worker_id for w in st.registry.all())
        st.registry.upsert(info)
        if not known:
            log.info(
                "worker %s registered: role=%s url=%s models=%s",
                info.worker_id,
                info.role,
                info.url,
                info.models,
            )
        return RegistrationReply(
            worker_id=info.worker_id,
            heartbeat_interval_s=max(0.5, config.heartbeat_ttl_s / 4),
            ttl_s=config.heartbeat_ttl_s,
        )

    @app.delete("/internal/workers/{worker_id}")
    async def deregister(worker_id: str, request: Request) -> JSONResponse:
        st = state(request)
        check_cluster_token(request, config.cluster_token)
        removed = st.registry.remove(worker_id)
        if removed:
            log.info("worker %s deregistered", worker_id)
        return JSONResponse({"removed": removed})

    @app.get("/internal/workers")
    async def list_workers(request: Request) -> JSONResponse:
        st = state(request)
        check_cluster_token(request, config.cluster_token)
        return JSONResponse(
            [
                {**w.info.model_dump(), "healthy": st.registry.is_healthy(w), "in_flight": w.in_flight}
                for w in st.registry.all()
            ]
        )

    return app


async def _expire_loop(registry: Registry, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        for wid in registry.expire():
            log.warning("worker %s expired (no heartbeat for %.1fs)", wid, registry.ttl_s)


async def _serve(st: RouterState, request: Request, kind: Kind, read_body) -> Response:
    """One client request end to end; see the module docstring for the flow."""
    started = time.perf_counter()
    endpoint = _PATHS[kind]
    request_id = f"pdm-{uuid.uuid4().hex}"
    status = "200"
    try:
        check_api_key(request, st.config.api_keys)
        body = parse_request(await read_body(request), kind)
        model = body["model"]
        _check_model(st, model)
        pd = _pd_push if st.config.pd_mode == "push" else _pd_nixl
        resp = await pd(st, body, kind, model, request_id, started)
        status = str(resp.status_code)
        return resp
    except OpenAIError as e:
        status = str(e.status)
        raise
    finally:
        st.metrics.requests.labels(endpoint, status).inc()


def _check_model(st: RouterState, model: str) -> None:
    known = st.registry.models()
    if model in known:
        return
    if not st.registry.all():
        raise OpenAIError(503, "no workers are registered with the router", code="no_workers")
    if not known:
        raise OpenAIError(503, "no healthy workers are available", code="no_workers")
    raise OpenAIError(
        404,
        f"model {model!r} does not exist; available: {', '.join(sorted(known))}",
        code="model_not_found",
        param="model",
    )


async def _pd_nixl(
    st: RouterState, body: dict, kind: Kind, model: str, request_id: str, started: float
) -> Response:
    path = _PATHS[kind]
    t0 = time.perf_counter()
    prefill = await st.upstream.call(
        "prefill",
        "prefill",
        model,
        path,
        lambda _w: pd_nixl.prefill_request(body),
        st.prefill_policy,
        request_id,
    )
    st.metrics.prefill.observe(time.perf_counter() - t0)
    try:
        prefill_json = prefill.response.json()
    except ValueError:
        raise OpenAIError(
            502, "prefill worker returned invalid JSON", code="PD_PREFILL_BAD_RESPONSE"
        ) from None
    decode_body = pd_nixl.decode_request(body, prefill_json)
    stream = bool(body.get("stream"))
    decode = await st.upstream.call(
        "decode", "decode", model, path, lambda _w: decode_body, st.decode_policy, request_id, stream=stream
    )
    st.metrics.pd_requests.labels("nixl").inc()
    return _decode_response(st, decode, path, request_id, started, stream)


async def _pd_push(
    st: RouterState, body: dict, kind: Kind, model: str, request_id: str, started: float
) -> Response:
    """Push PD: choose D, have a prefill worker compute the prompt and push its chunks to D, then decode on D.

    If no prefill worker can serve the leg, D computes the prompt itself (a counted fallback). If D fails before
    its first byte, another decode worker gets the plain request (it computes; nothing was pushed to it).
    """
    path = _PATHS[kind]
    stream = bool(body.get("stream"))
    decoders = st.registry.candidates("decode", model)
    if not decoders:
        raise OpenAIError(503, f"no healthy decode worker for model {model!r}", code="PD_PEER_UNAVAILABLE")
    target = st.decode_policy.choose(decoders, body)
    transfer_id = request_id
    deadline_ms = st.config.pd_transfer_deadline_ms
    pushed = False
    if target.info.transfer_address:
        t0 = time.perf_counter()
        try:
            await st.upstream.call(
                "prefill",
                "prefill",
                model,
                path,
                lambda _w: pd_push.prefill_request(
                    body, transfer_id, target.info.transfer_address, deadline_ms
                ),
                st.prefill_policy,
                request_id,
            )
            pushed = True
            st.metrics.prefill.observe(time.perf_counter() - t0)
        except OpenAIError as e:
            if e.status < 500:
                raise
            log.warning(
                "request %s: prefill leg failed (%s); decode worker computes the prompt",
                request_id,
                e.message,
            )
            st.metrics.pd_requests.labels("fallback").inc()

    def decode_body(w) -> dict:
        return (
            pd_push.decode_request(body, transfer_id, deadline_ms) if pushed and w.id == target.id else body
        )

    decode = await st.upstream.call(
        "decode",
        "decode",
        model,
        path,
        decode_body,
        pd_push.Prefer(target.id, st.decode_policy),
        request_id,
        stream,
    )
    st.metrics.pd_requests.labels("push" if pushed else "decode_only").inc()
    if pushed and not stream:
        _count_transfer_fallback(st, decode.response.content, request_id)
    return _decode_response(st, decode, path, request_id, started, stream)


def _decode_response(
    st: RouterState, decode: LegResult, path: str, request_id: str, started: float, stream: bool
) -> Response:
    """The client's response: the decode worker's body as is, or its stream relayed as it arrives."""
    if stream:
        return _streaming_response(st, decode, path, request_id, started)
    st.metrics.e2e.labels(path).observe(time.perf_counter() - started)
    return Response(
        decode.response.content,
        status_code=decode.response.status_code,
        media_type="application/json",
        headers={"X-Request-Id": request_id},
    )


def _count_transfer_fallback(st: RouterState, content: bytes, request_id: str) -> None:
    """The decode worker reports in ``kv_transfer_params.pdmesh`` whether the pushed KV arrived in time."""
    if b"fallback" not in content:
        return
    try:
        report = (json.loads(content).get("kv_transfer_params") or {}).get("pdmesh") or {}
    except (ValueError, AttributeError):
        return
    if report.get("fallback") is not True:
        return
    st.metrics.pd_requests.labels("transfer_fallback").inc()
    log.warning("request %s: pushed KV missed the deadline; the decode worker computed the rest", request_id)


def _streaming_response(
    st: RouterState, decode: LegResult, path: str, request_id: str, started: float
) -> Response:
    def first_byte() -> None:
        st.metrics.ttft.labels(path).observe(time.perf_counter() - started)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in st.upstream.relay_stream(decode, first_byte):
            yield chunk
        st.metrics.e2e.labels(path).observe(time.perf_counter() - started)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"X-Request-Id": request_id, "Cache-Control": "no-cache"},
        background=BackgroundTask(decode.response.aclose),
    )
