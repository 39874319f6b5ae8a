"""The router's per-process state: configuration, registry, metrics, upstream client, policies, caches.

Built once by :func:`pdmesh.router.app.create_app` and owned by the app (no module globals); the request flow
(:mod:`router.flow`, :mod:`router.legs`) and the other routes read it from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdmesh.router.config import RouterConfig
from pdmesh.router.deciders import DeciderChain
from pdmesh.router.limits import Limiter
from pdmesh.router.metrics import RouterMetrics
from pdmesh.router.policy_set import PolicySet, RequestIds
from pdmesh.router.prefix_index import PrefixIndex
from pdmesh.router.prompt_analysis import PromptAnalyzer
from pdmesh.router.registry import Registry
from pdmesh.router.tier_lookup import TierLookup
from pdmesh.router.tracing import RequestTracer
from pdmesh.router.upstream import Upstream


@dataclass
class RouterState:
    config: RouterConfig
    registry: Registry
    metrics: RouterMetrics
    upstream: Upstream
    limiter: Limiter
    policies: PolicySet
    index: PrefixIndex
    analyzer: PromptAnalyzer
    tier_lookup: TierLookup
    tracer: RequestTracer | None = None  # OpenTelemetry spans per request; None = off
    # Prompt tokens of the prefill legs in flight from this process (conditional PD's queue rule reads it; the
    # same number is the gauge pdmesh_router_pool_inflight_tokens{role="prefill"}).
    prefill_tokens_in_flight: int = 0
    request_ids: RequestIds = field(default_factory=RequestIds)
    # conditional PD: the deciders the config turns on (built from ``config.conditional_pd`` when not given)
    deciders: DeciderChain | None = None

    def __post_init__(self) -> None:
        if self.deciders is None:
            self.deciders = DeciderChain(self.config.conditional_pd)
