"""Router configuration: a pydantic model loaded from YAML and ``PDMESH_ROUTER_*`` environment variables.

Top-level keys map to ``PDMESH_ROUTER_<KEY>``; keys of a section map to ``PDMESH_ROUTER_<SECTION>_<KEY>``
(e.g. ``PDMESH_ROUTER_LIMITS_RATE_PER_S=50``). Lists in env vars are comma separated. Structured values
(worker lists, per-model policies) come from the YAML file only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdmesh.router.errors import RouterError
from pdmesh.security import cluster_token_from_env

WorkerRole = Literal["prefill", "decode", "both"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolPolicies(_Section):
    """Which policy picks the worker of each pool. The default, ``cache_aware`` in both pools, sends a prompt
    to the worker that holds its longest prefix (and balances by load when none does): on traffic that shares
    prefixes (chat sessions, documents asked several times) it is the one that wins (bench/bench_workload.py)."""

    prefill: str = "cache_aware"
    decode: str = "cache_aware"

    @field_validator("prefill", "decode")
    @classmethod
    def _registered(cls, name: str) -> str:
        from pdmesh.router.policies import POLICIES  # the registry is the one list of names

        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
        return name


class CacheAwareConfig(_Section):
    """Cache-aware choice: prefix chunk keys of the templated prompt, matched against a router-side index
    of recent prompts (and, when workers register a ``tier_url``, their tier's ``/lookup``)."""

    # token ids from the worker's POST /tokenize (exact); "chars": hash the templated text in char chunks.
    tokenizer: Literal["worker", "chars"] = "worker"
    tokenize_timeout_s: float = Field(0.5, gt=0)
    chunk_tokens: int = Field(128, ge=1)
    chunk_chars: int = Field(512, ge=16)
    # Bounded memory: chunk keys kept in the prefix index; total token ids kept by the tokenize cache.
    index_chunks: int = Field(200_000, ge=1)
    tokenize_cache_tokens: int = Field(4_000_000, ge=0)
    # Ask the tiers' /lookup when a worker registered a tier_url.
    tier_lookup: bool = True
    tier_lookup_timeout_s: float = Field(0.05, gt=0)
    # Load guard: prefer the least loaded worker when the best cached one has this many more in flight.
    max_load_imbalance: int = Field(16, ge=0)


class ConditionalPDConfig(_Section):
    """Conditional disaggregation. A prompt goes decode-only when the part the chosen decode worker does not hold
    yet (router index of what it served, its tier) is shorter than ``min_uncached_tokens`` (a prefill leg costs a
    round trip and a push, more than the decode worker computing a few hundred tokens itself), or when the
    prefill pool is queued (``max_prefill_queue_tokens``), or when the chosen decode worker has no request in flight
    and the part it does not hold is at most ``idle_decoder_max_uncached_tokens`` (PD keeps a prompt's compute
    away from running streams; with none running, a prefill leg only adds its round trip and the push). 0 turns a
    rule off; all 0 = always PD."""

    min_uncached_tokens: int = Field(512, ge=0)
    # Load: a prompt goes decode-only when the prefill legs in flight (from this router process) already hold this
    # many prompt tokens per prefill worker: it would queue behind them. 0 = off (PD whatever the queue).
    # Default 4096: on the workload benchmark it cut doc-QA TTFT p50 0.42 -> 0.18 s and chat p90 2.75 -> 2.30 s.
    max_prefill_queue_tokens: int = Field(4096, ge=0)
    # Idle decoder: "no request in flight" as this router process sees it (each router process decides alone).
    # The bound caps how long the decoder is busy computing when a request arrives right after.
    idle_decoder_max_uncached_tokens: int = Field(2048, ge=0)


class StaticWorker(_Section):
    url: str = Field(pattern=r"^https?://")
    role: WorkerRole
    models: list[str] = Field(min_length=1)
    worker_id: str | None = None
    transfer_address: str | None = None
    device_transfer_address: str | None = None  # a decoder's device landing (docs/transfer.md)
    tier_url: str | None = None


class DnsTarget(_Section):
    """A DNS name resolving to several replicas (compose ``--scale``): each A/AAAA record is one worker."""

    name: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    role: WorkerRole
    models: list[str] = Field(min_length=1)
    scheme: Literal["http", "https"] = "http"
    transfer_port: int | None = Field(default=None, ge=1, le=65535)
    tier_port: int | None = Field(default=None, ge=1, le=65535)


class DiscoveryConfig(_Section):
    static: list[StaticWorker] = Field(default_factory=list)
    dns: list[DnsTarget] = Field(default_factory=list)
    dns_interval_s: float = Field(5.0, gt=0)


class HealthCheckConfig(_Section):
    """Active checks (GET <url><path>) of static and DNS workers; registered workers prove life by heartbeat."""

    interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    path: str = "/health"
    unhealthy_after: int = Field(2, ge=1)  # consecutive failed checks
    healthy_after: int = Field(1, ge=1)  # consecutive good checks


class BreakerConfig(_Section):
    """Per-worker circuit breaker: opens after ``failures`` consecutive failed attempts, stays open
    ``open_s`` (doubling per reopen up to ``max_open_s``), then lets one trial request through."""

    failures: int = Field(3, ge=1)
    open_s: float | None = Field(None, ge=0)  # default: failure_cooldown_s
    max_open_s: float = Field(60.0, ge=0)


class RetryConfig(_Section):
    backoff_s: float = Field(0.02, ge=0)  # before the 2nd attempt; doubles, with jitter
    backoff_max_s: float = Field(0.5, ge=0)


class TracingConfig(_Section):
    """OpenTelemetry spans of each request's TTFT breakdown (:mod:`router.tracing`); off when no endpoint."""

    otlp_endpoint: str | None = Field(None, pattern=r"^https?://")  # e.g. http://collector:4318/v1/traces
    service_name: str = "pdmesh-router"


class SloConfig(_Section):
    """Latency goals the router counts requests against (``pdmesh_router_slo_requests_total``), for autoscaling and
    alerts. Unset: not counted. Streamed requests only (a non-streamed answer has no first token to time): TTFT once
    per request, a stream that ends before its first token counting as a miss; ITL once per completed decode
    stream (each part of a batched or ``n`` > 1 request). Requests refused before streaming are in
    ``pdmesh_router_requests_total{status}``."""

    ttft_s: float | None = Field(None, gt=0)  # time to first token of a streamed request
    itl_s: float | None = Field(None, gt=0)  # a streamed request's mean time between tokens (chunks)


class LimitsConfig(_Section):
    """Admission limits (429 + Retry-After). 0 disables a limit. Per-key limits apply to each API key
    (to all anonymous clients together when no API keys are configured)."""

    max_concurrency: int = Field(0, ge=0)
    rate_per_s: float = Field(0, ge=0)
    burst: int = Field(0, ge=0)  # 0: max(1, rate_per_s)
    per_key_max_concurrency: int = Field(0, ge=0)
    per_key_rate_per_s: float = Field(0, ge=0)
    per_key_burst: int = Field(0, ge=0)


class RouterConfig(BaseModel):
    """Everything the router needs. Unknown keys are errors (typos must not pass silently)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Router processes sharing the port (SO_REUSEPORT); one Python process uses one core. 0: one per core
    # this process may run on (resolved when the config is loaded).
    processes: int = Field(1, ge=0, le=64)
    # push: pdmesh connector + tier push (default); nixl: stock vLLM NixlConnector pull protocol.
    pd_mode: Literal["push", "nixl"] = "push"
    # push mode: how long a decode worker waits for pushed chunks before computing the rest.
    pd_transfer_deadline_ms: int = Field(5000, ge=0, le=600_000)
    # Send the decode leg together with the prefill leg (router/legs.py: saves D's setup, costs a wait on D when
    # the prefill pool queues).
    pd_overlap_legs: bool = False
    # Workers are dropped when no heartbeat arrived for this long.
    heartbeat_ttl_s: float = Field(10.0, gt=0)
    # A worker whose breaker opened is skipped for this long (the breaker's first open interval).
    failure_cooldown_s: float = Field(5.0, ge=0)
    # Inside a cluster a connect takes well under a millisecond: a worker that does not accept within this is
    # gone (a killed container), and the leg is retried on another worker.
    connect_timeout_s: float = Field(1.0, gt=0)
    # Upper bound for one upstream leg (prefill, or the whole decode stream).
    request_timeout_s: float = Field(600.0, gt=0)
    # CA bundle (PEM) that verifies https workers; unset: the system's CA store.
    worker_ca_file: str | None = None
    # The client must send its whole request body within this long (408 otherwise).
    body_timeout_s: float = Field(30.0, gt=0)
    # A client connection must send a complete request head within this long (slowloris: closed after it).
    header_timeout_s: float = Field(10.0, gt=0)
    # Open client connections per router process; one more is closed at once.
    max_connections: int = Field(4096, ge=1)
    # The largest request head (request line + header fields) in bytes: more is answered 431 and the connection
    # closed, before the request exists (pdmesh/http_guard.py).
    max_head_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Whole-request deadline (all legs, retries and the stream); 504 before the first byte, an error event after.
    request_deadline_s: float = Field(600.0, gt=0)
    # Attempts per leg before the first byte reached the client (other workers first).
    max_attempts: int = Field(3, ge=1, le=10)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    # A batched completion (several prompts in one request) routes at most this many prompts at a time.
    batch_parallelism: int = Field(8, ge=1, le=256)
    # The most sequences one request may ask for: its prompts (a batched completion's, else 1) x ``n``; more is a
    # 400 ``too_many_parts``. Each sequence is admitted as one request against ``limits``.
    max_batch_parts: int = Field(1024, ge=1, le=131_072)
    # Public API keys (Authorization: Bearer ...). Empty: no client auth.
    api_keys: list[str] = Field(default_factory=list)
    # Token for internal endpoints (worker registration). Empty: allowed only on loopback binds.
    cluster_token: str = Field(default_factory=cluster_token_from_env)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    # Session affinity reads this header (falls back to the body's "user" field).
    session_header: str = "x-session-id"
    policies: PoolPolicies = Field(default_factory=PoolPolicies)
    # Per-model overrides of ``policies``: {model name: {prefill: ..., decode: ...}}.
    model_policies: dict[str, PoolPolicies] = Field(default_factory=dict)
    cache_aware: CacheAwareConfig = Field(default_factory=CacheAwareConfig)
    conditional_pd: ConditionalPDConfig = Field(default_factory=ConditionalPDConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    slo: SloConfig = Field(default_factory=SloConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RouterConfig:
        if self.retry.backoff_max_s < self.retry.backoff_s:
            raise ValueError("retry.backoff_max_s must be >= retry.backoff_s")
        if self.breaker.open_s is None:
            self.breaker.open_s = self.failure_cooldown_s
        return self

    @field_validator("worker_ca_file")
    @classmethod
    def _ca_readable(cls, v: str | None) -> str | None:
        if v is not None and not os.access(v, os.R_OK):
            raise ValueError(f"cannot read CA file {v!r}")
        return v

    @field_validator("processes")
    @classmethod
    def _cores_when_zero(cls, v: int) -> int:
        return v or min(64, len(os.sched_getaffinity(0)))

    @property
    def session_header_bytes(self) -> bytes:
        """``session_header`` as ASGI spells header names (lower-case bytes)."""
        return self.session_header.lower().encode("latin-1")

    def pool_policy(self, model: str, role: str) -> str:
        return getattr(self.model_policies.get(model, self.policies), role)


class RouterConfigError(RouterError, ValueError):
    """A configuration file or variable is invalid; the message names the field."""


_ENV_PREFIX = "PDMESH_ROUTER_"


def _env_value(raw: str, annotation: object) -> object:
    return [s for s in raw.split(",") if s] if annotation == list[str] else raw


def _from_env(data: dict[str, object]) -> None:
    for name, field in RouterConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section):
            section = dict(data.get(name) or {}) if isinstance(data.get(name), dict) else {}
            for sub, sub_field in annotation.model_fields.items():
                raw = os.environ.get(f"{_ENV_PREFIX}{name.upper()}_{sub.upper()}")
                if raw is not None:
                    section[sub] = _env_value(raw, sub_field.annotation)
            if section:
                data[name] = section
            continue
        raw = os.environ.get(_ENV_PREFIX + name.upper())
        if raw is not None:
            data[name] = _env_value(raw, annotation)


def load_router_config(path: str | os.PathLike[str] | None = None, **overrides: object) -> RouterConfig:
    """Merge, lowest first: defaults, YAML file, ``PDMESH_ROUTER_<FIELD>`` env vars, explicit overrides.

    List fields in env vars are comma separated. Raises :class:`RouterConfigError` with a readable message.
    """
    data: dict[str, object] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RouterConfigError(f"cannot read router config {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise RouterConfigError(f"router config {path} must be a mapping")
        section = loaded.get("router", loaded)
        if not isinstance(section, dict):
            raise RouterConfigError(f"router config {path}: 'router' must be a mapping")
        data.update(section)
    _from_env(data)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise RouterConfigError("invalid router config:\n" + "\n".join(lines)) from None
