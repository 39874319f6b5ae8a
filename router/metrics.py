"""Prometheus metrics of the router, in a registry owned by the app (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    def __init__(self, ttft_slo_s: float | None = None, itl_slo_s: float | None = None) -> None:
        """``ttft_slo_s`` / ``itl_slo_s``: the configured goals (``slo`` section); None: not counted."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft_slo_s, self.itl_slo_s = ttft_slo_s, itl_slo_s
        self.slo = Counter(
            "pdmesh_router_slo_requests",
            "Streamed requests against the configured goals (slo.ttft_s, slo.itl_s), by signal and whether met",
            ["signal", "met"],
            registry=r,
        )
        self.requests = Counter(
            "pdmesh_router_requests",
            "Client requests by endpoint and final status",
            ["endpoint", "status"],
            registry=r,
        )
        self.e2e = Histogram(
            "pdmesh_router_e2e_seconds",
            "Request latency until the last byte",
            ["endpoint"],
            buckets=_LAT_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "pdmesh_router_ttft_seconds",
            "Time to first streamed byte",
            ["endpoint"],
            buckets=_LAT_BUCKETS,
            registry=r,
        )
        self.ttft_stages = Histogram(
            "pdmesh_router_ttft_stage_seconds",
            "Time to first token by stage (route, prefill_leg, decode_first_byte, decode_after_prefill)",
            ["stage"],
            buckets=_LAT_BUCKETS,
            registry=r,
        )
        self.prefill = Histogram(
            "pdmesh_router_prefill_leg_seconds",
            "Duration of the prefill leg",
            buckets=_LAT_BUCKETS,
            registry=r,
        )
        self.pd_requests = Counter(
            "pdmesh_router_pd_requests", "Requests served by PD, by mode", ["mode"], registry=r
        )
        self.upstream_errors = Counter(
            "pdmesh_router_upstream_errors",
            "Failed upstream attempts by leg and reason",
            ["leg", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "pdmesh_router_retries", "Leg attempts retried on another worker", ["leg"], registry=r
        )
        self.stream_aborts = Counter(
            "pdmesh_router_stream_errors", "Streams ended by an error event after the first byte", registry=r
        )
        self.itl = Histogram(
            "pdmesh_router_itl_seconds",
            "Time between streamed chunks (inter-token latency)",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.errors = Counter(
            "pdmesh_router_errors",
            "Failed or cut requests by typed reason (PD_* codes, CLIENT_DISCONNECTED, RATE_LIMITED, ...)",
            ["reason"],
            registry=r,
        )
        self.tier_lookups = Counter(
            "pdmesh_router_tier_lookups",
            "Requests whose prompt was looked up in the workers' tiers, or not because the router's own index "
            "already showed a decode worker holding it (skipped), or because the prompt's identity (an image, a LoRA "
            "adapter) is keyed by what only the engine sees (identity)",
            ["outcome"],
            registry=r,
        )
        self.decode_only = Counter(
            "pdmesh_router_decode_only",
            "Requests served without a prefill leg, by reason",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pdmesh_router_prompt_tokens",
            "Prompt tokens of completed requests: the prefill leg's usage (PD), else the router's analysis",
            registry=r,
        )
        self.worker_legs = Counter(
            "pdmesh_router_worker_legs",
            "Leg attempts sent to each worker, by leg (prefill, decode, ...)",
            ["worker", "leg"],
            registry=r,
        )
        self.worker_leg_failures = Counter(
            "pdmesh_router_worker_leg_failures",
            "Leg attempts that failed on each worker (connect, timeout, 5xx, broken response)",
            ["worker", "leg"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "pdmesh_router_cached_prefix_tokens",
            "Prompt tokens believed cached on the chosen prefill worker (cache-aware routing)",
            registry=r,
        )
        self.worker_healthy = Gauge(
            "pdmesh_router_worker_healthy", "1 when a worker is healthy", ["worker", "role"], registry=r
        )
        self.breaker_open = Gauge(
            "pdmesh_router_worker_breaker_open",
            "1 while a worker's circuit breaker is open",
            ["worker"],
            registry=r,
        )
        self.workers = Gauge(
            "pdmesh_router_workers", "Registered workers by role and health", ["role", "healthy"], registry=r
        )
        self.in_flight = Gauge(
            "pdmesh_router_worker_in_flight", "Requests in flight per worker", ["worker"], registry=r
        )
        # Scaling signals per pool (the HPAs of deploy/kubernetes, docs/kubernetes.md)
        self.pool_inflight = Gauge(
            "pdmesh_router_pool_inflight", "Legs in flight on the pool's workers", ["role"], registry=r
        )
        self.pool_inflight_tokens = Gauge(
            "pdmesh_router_pool_inflight_tokens",
            "Prompt tokens of the prefill legs in flight (the work queued on the prefill pool)",
            ["role"],
            registry=r,
        )

    def count_ttft(self, seconds: float) -> None:
        """One streamed request's time to first token against ``slo.ttft_s`` (nothing when unset)."""
        if self.ttft_slo_s is not None:
            self.slo.labels("ttft", "true" if seconds <= self.ttft_slo_s else "false").inc()

    def count_itl(self, mean_seconds: float) -> None:
        """One streamed request's mean inter-token latency against ``slo.itl_s`` (nothing when unset)."""
        if self.itl_slo_s is not None:
            self.slo.labels("itl", "true" if mean_seconds <= self.itl_slo_s else "false").inc()
