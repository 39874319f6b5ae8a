"""The router's FastAPI app: OpenAI endpoints, registration, health, metrics, background loops.

The request flow itself lives in :mod:`router.flow`. State lives in :class:`router.flow.RouterState`, created
per app (no module-level singletons). Background tasks (heartbeat expiry, DNS discovery, active health checks)
run for the app's lifespan and are cancelled on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Coroutine

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from pdmesh.router import flow
from pdmesh.router.auth import check_api_key, check_cluster_token
from pdmesh.router.config import RouterConfig
from pdmesh.router.discovery import Discovery
from pdmesh.router.errors import OpenAIError, install_error_handlers
from pdmesh.router.exchange import Exchange, Receive, Scope, Send, read_limited
from pdmesh.router.health_checks import HealthChecker
from pdmesh.router.leg_client import LegClient
from pdmesh.router.limits import Limiter
from pdmesh.router.metrics import RouterMetrics
from pdmesh.router.openai_requests import Kind
from pdmesh.router.passthrough import install_passthrough
from pdmesh.router.peers import RELAYED_HEADER, Peers, merge_metrics
from pdmesh.router.policy_set import PolicySet
from pdmesh.router.prefix_index import PrefixIndex
from pdmesh.router.prompt_analysis import PromptAnalyzer
from pdmesh.router.registration import WORKER_ID_PATTERN, RegistrationReply, WorkerRegistration
from pdmesh.router.registry import BreakerSettings, Registry
from pdmesh.router.state import RouterState
from pdmesh.router.tier_lookup import HttpTierLookup
from pdmesh.router.tracing import make_tracer
from pdmesh.router.upstream import Upstream
from pdmesh.security import worker_api_key

log = logging.getLogger("pdmesh.router")


def _worker_tls(cfg: RouterConfig) -> ssl.SSLContext:
    """How https workers are verified: ``worker_ca_file`` if set, else the system's CA store."""
    return ssl.create_default_context(cafile=cfg.worker_ca_file)


def _make_leg_client(cfg: RouterConfig) -> LegClient:
    """The legs' client (hot path): keep-alive pool, bounded connect and read waits."""
    return LegClient(cfg.connect_timeout_s, cfg.request_timeout_s, ssl_context=_worker_tls(cfg))


def _make_client(cfg: RouterConfig) -> httpx.AsyncClient:
    """Client for the side calls (health checks, /tokenize, tier /lookup); each call passes its own timeout."""
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s)
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=512, keepalive_expiry=30)
    key = worker_api_key(cfg.cluster_token)
    return httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        http2=False,
        trust_env=False,
        verify=_worker_tls(cfg),
        headers={"Authorization": f"Bearer {key}"} if key else None,
    )


class RouterApp:
    """The router's ASGI app: the completion routes (hot path) on raw ASGI, everything else on FastAPI.

    ``fastapi`` runs the lifespan (clients, background tasks) and owns the state both halves use.
    """

    def __init__(self, fastapi: FastAPI) -> None:
        self.fastapi = fastapi

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _HOT_PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            await self.fastapi(scope, receive, send)
            return
        ex = Exchange(scope, receive, send)
        if scope["method"] != "POST":
            await ex.error(
                OpenAIError(405, f"method {scope['method']} not allowed; use POST", code="method_not_allowed")
            )
            return
        await flow.serve(self.fastapi.state.router, ex, kind)


_HOT_PATHS: dict[str, Kind] = {path: kind for kind, path in flow.PATHS.items()}


def create_app(config: RouterConfig, peers: Peers | None = None) -> RouterApp:
    """Build the app. The clients and the background tasks live for the app's lifespan.

    ``peers``: the sibling processes when the router runs several (:mod:`router.processes`); the app then
    relays registrations to them, copies their workers at start and merges their metrics.
    """
    b = config.breaker
    registry = Registry(
        config.heartbeat_ttl_s,
        config.failure_cooldown_s,
        breaker=BreakerSettings(b.failures, b.open_s or 0.0, b.max_open_s),
    )
    metrics = RouterMetrics(config.slo.ttft_s, config.slo.itl_s)
    discovery = Discovery(config.discovery, registry)
    discovery.load_static()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = _make_client(config)
        legs = _make_leg_client(config)
        index = PrefixIndex(config.cache_aware.index_chunks)
        app.state.router = RouterState(
            config=config,
            registry=registry,
            metrics=metrics,
            upstream=Upstream(
                legs,
                registry,
                metrics,
                config.max_attempts,
                config.retry.backoff_s,
                config.retry.backoff_max_s,
                worker_key=worker_api_key(config.cluster_token),
            ),
            limiter=Limiter(config.limits),
            policies=PolicySet(config, index),
            index=index,
            analyzer=PromptAnalyzer(config.cache_aware, client),
            tier_lookup=HttpTierLookup(
                client, config.cluster_token, config.cache_aware.tier_lookup_timeout_s
            ),
            tracer=make_tracer(config.tracing.otlp_endpoint, config.tracing.service_name),
        )
        loops: list[Coroutine] = [_expire_loop(registry, min(1.0, config.heartbeat_ttl_s / 4))]
        if config.discovery.dns:
            loops.append(discovery.run())
        if config.discovery.static or config.discovery.dns:
            loops.append(HealthChecker(config.health_check, registry, client).run())
        tasks = [asyncio.create_task(c) for c in loops]
        if peers is not None:
            copied = await peers.bootstrap(registry)
            if copied:
                log.info("copied %d registered workers from a sibling router process", copied)
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await client.aclose()
            legs.close()
            if app.state.router.tracer is not None:
                await asyncio.to_thread(
                    app.state.router.tracer.close
                )  # flushes spans (bounded by the exporter)
            if peers is not None:
                await peers.aclose()

    app = FastAPI(title="pdmesh router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    def state(request: Request) -> RouterState:
        return request.app.state.router

    install_passthrough(app, state)

    async def read_body(request: Request) -> bytes:
        return await read_limited(
            request.stream(), request.headers.get("content-length"), config.max_body_bytes
        )

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
        local = _local_metrics(state(request))
        if peers is None or request.query_params.get("local") == "1":
            return Response(local, media_type=CONTENT_TYPE_LATEST)
        texts = await peers.metrics_texts()
        texts[peers.own_index] = local.decode()
        merged = merge_metrics(texts)
        return Response(merged, media_type=CONTENT_TYPE_LATEST)

    def _local_metrics(st: RouterState) -> bytes:
        st.metrics.workers.clear()
        counts: dict[tuple[str, str], int] = {}
        st.metrics.in_flight.clear()
        st.metrics.worker_healthy.clear()
        st.metrics.breaker_open.clear()
        for w in st.registry.all():
            healthy = st.registry.is_healthy(w)
            key = (w.info.role, str(healthy).lower())
            counts[key] = counts.get(key, 0) + 1
            st.metrics.in_flight.labels(w.id).set(w.in_flight)
            st.metrics.worker_healthy.labels(w.id, w.info.role).set(int(healthy))
            st.metrics.breaker_open.labels(w.id).set(int(w.breaker.state == "open"))
        for (role, healthy), n in counts.items():
            st.metrics.workers.labels(role, healthy).set(n)
        for role in ("prefill", "decode"):
            st.metrics.pool_inflight.labels(role).set(
                sum(w.in_flight for w in st.registry.all() if w.info.role == role)
            )
        return generate_latest(st.metrics.registry)

    @app.post("/internal/workers")
    async def register(request: Request) -> RegistrationReply:
        st = state(request)
        check_cluster_token(request, config.cluster_token)
        raw = await read_body(request)
        try:
            info = WorkerRegistration.model_validate_json(raw)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise OpenAIError(400, f"invalid registration: {param}: {err['msg']}", param=param) from None
        known = any(w.id == info.worker_id for w in st.registry.all())
        st.registry.upsert(info)
        if peers is not None and RELAYED_HEADER not in request.headers:
            await peers.relay_registration(raw)
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
            heartbeat_interval_s=st.registry.heartbeat_interval_s,
            ttl_s=config.heartbeat_ttl_s,
        )

    @app.delete("/internal/workers/{worker_id}")
    async def deregister(worker_id: str, request: Request) -> JSONResponse:
        st = state(request)
        check_cluster_token(request, config.cluster_token)
        if not re.fullmatch(WORKER_ID_PATTERN, worker_id):
            raise OpenAIError(400, "invalid worker id", param="worker_id", code="invalid_request")
        removed = st.registry.remove(worker_id)
        if peers is not None and RELAYED_HEADER not in request.headers:
            await peers.relay_deregistration(worker_id)
        if removed:
            log.info("worker %s deregistered", worker_id)
        return JSONResponse({"removed": removed})

    @app.get("/internal/workers")
    async def list_workers(request: Request) -> JSONResponse:
        st = state(request)
        check_cluster_token(request, config.cluster_token)
        return JSONResponse(
            [
                {
                    **w.info.model_dump(),
                    "source": w.source,
                    "healthy": st.registry.is_healthy(w),
                    "breaker": w.breaker.state,
                    "in_flight": w.in_flight,
                }
                for w in st.registry.all()
            ]
        )

    return RouterApp(app)


async def _expire_loop(registry: Registry, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        for wid in registry.expire():
            log.warning("worker %s expired (no heartbeat for %.1fs)", wid, registry.ttl_s)
