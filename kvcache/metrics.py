"""Prometheus metrics of a tier server: a collector that reads the tiers' counters at scrape time.

Families (label ``tier`` in ``memory``, ``disk``, ``remote``): ``pdmesh_tier_hits_total``,
``pdmesh_tier_misses_total``, ``pdmesh_tier_evictions_total``, ``pdmesh_tier_bytes_read_total``,
``pdmesh_tier_bytes_written_total``, ``pdmesh_tier_used_bytes``, ``pdmesh_tier_capacity_bytes``; plus
``pdmesh_tier_corrupt_total{tier}``, ``pdmesh_tier_remote_errors_total``,
``pdmesh_tier_remote_mac_failures_total`` (remote chunks whose record tag did not verify: planted, altered or
written under another cluster token; read as misses), ``pdmesh_tier_remote_up`` and
``pdmesh_tier_pool_{pinned,in_use,in_flight}_chunks``; with PD transfer enabled ``pdmesh_tier_push{,_failures,
_chunks,_bytes,_seconds}_total``, ``pdmesh_tier_push_by_backend_total{backend}``,
``pdmesh_tier_received_{commits,aborts}_total`` and ``pdmesh_tier_receive_leases``.
Each server has its own ``CollectorRegistry``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_COUNTERS = {
    "hits": "Chunk lookups/loads served by the tier",
    "misses": "Chunk lookups/loads the tier could not serve",
    "evictions": "Chunks evicted from the tier",
    "bytes_read": "Chunk bytes read from the tier",
    "bytes_written": "Chunk bytes written to the tier",
    "corrupt": "Chunks that failed verification and were dropped",
}
_GAUGES = {"used_bytes": "Bytes held by the tier", "capacity_bytes": "Byte bound of the tier"}


class TierCollector:
    """``snapshot()`` returns ``{"tiers": {tier: {counter/gauge name: value}}, "extra": {name: value}}``."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self._snapshot = snapshot

    def collect(self):
        snap = self._snapshot()
        tiers: dict[str, dict] = snap["tiers"]
        for name, doc in _COUNTERS.items():
            fam = CounterMetricFamily(f"pdmesh_tier_{name}", doc, labels=["tier"])
            for tier, values in tiers.items():
                if name in values:
                    fam.add_metric([tier], float(values[name]))
            yield fam
        for name, doc in _GAUGES.items():
            fam = GaugeMetricFamily(f"pdmesh_tier_{name}", doc, labels=["tier"])
            for tier, values in tiers.items():
                if name in values:
                    fam.add_metric([tier], float(values[name]))
            yield fam
        by_backend = snap.get("push_by_backend")
        if by_backend is not None:
            fam = CounterMetricFamily(
                "pdmesh_tier_push_by_backend",
                "Pushes by the transfer backend they went over",
                labels=["backend"],
            )
            for backend, n in by_backend.items():
                fam.add_metric([backend], float(n))
            yield fam
        for name, value in snap.get("extra", {}).items():
            if name.endswith("_total"):
                yield CounterMetricFamily(f"pdmesh_tier_{name[: -len('_total')]}", name, value=float(value))
            else:
                yield GaugeMetricFamily(f"pdmesh_tier_{name}", name, value=float(value))


def make_registry(snapshot: Callable[[], dict]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TierCollector(snapshot))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
