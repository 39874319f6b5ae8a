"""The connector's counts as vLLM's ``KVConnectorStats``, so they reach vLLM's own logging and ``/metrics``.

How they travel (vLLM 0.32, ``vllm/v1/core/sched/scheduler.py`` and ``vllm/v1/metrics/loggers.py``):

- Worker half: after every model-runner step vLLM calls the worker-side connector's ``get_kv_connector_stats()``
  and ships the object in the step's ``KVConnectorOutput`` to the scheduler process (pickled across worker
  processes; ``KVOutputAggregator`` aggregates the objects of an engine's tensor ranks / pipeline stages).
- Scheduler half: in ``update_from_output`` the scheduler calls its own connector's ``get_kv_connector_stats()``
  and aggregates a non-empty result into the workers' object.
- The sum goes out as ``SchedulerStats.kv_connector_stats`` (``to_dict()``, i.e. ``data``, msgpack-encoded) to the
  API server, where ``PdmeshPromMetrics.observe`` adds it to the ``vllm:pdmesh_*`` counters and the logging stat
  logger rebuilds it (``PdmeshConnector.build_kv_connector_stats``), aggregates it over the log interval and logs
  ``reduce()`` as ``KV Transfer metrics: ...``. Both need vLLM's stat logging on (no ``--disable-log-stats``).

So every object handed to vLLM holds *deltas*: what was counted since the previous ``get_kv_connector_stats()``
of the same half. The halves keep their own lifetime totals (``SchedulerStats``, ``WorkerStats``, the device
path's ``DevicePushStats`` / ``LandingStats``); :class:`StatsInterval` turns a snapshot of those totals into the
delta since the last one.

``data`` is a flat ``{counter: int}``: the names in :data:`COUNTERS`, plus ``skipped:<reason>`` for requests the
scheduler half did not key (``pdmesh.connector.identity``: ``prompt_embeds``, ``multimodal_unhashed``,
``unreadable``). It holds only plain ints and strings (vLLM serializes it with msgpack).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT

SKIPPED = "skipped"  # data key prefix ``skipped:<reason>``: the scheduler half's skips, by reason

# counter name in ``data`` -> its Prometheus documentation; the series is ``vllm:pdmesh_<name>_total``
COUNTERS: dict[str, str] = {
    # scheduler half (connector/scheduler.py, SchedulerStats)
    "lookups": "Tier lookups the pdmesh connector's scheduler half made (one per decision or PD poll).",
    "lookup_errors": "Tier lookups that failed (tier down or slow); counted as 0 hits, the request computes.",
    "hit_tokens": "Prompt tokens the scheduler half offered vLLM as loadable from the tier (external hits).",
    "pd_waits": "Engine steps a PD decode leg kept a request waiting for pushed chunks.",
    "pd_fallbacks": "PD decode legs whose pushed chunks missed the deadline (the rest was computed).",
    # worker half (connector/worker.py, WorkerStats)
    "loaded_chunks": "Chunks the worker half unpacked into vLLM's KV blocks (from the tier or device landing).",
    "loaded_bytes": "Bytes of KV the worker half loaded into vLLM's KV blocks.",
    "load_errors": "Planned chunk loads that failed (evicted, tier down, layout refused); vLLM recomputes them.",
    "saved_chunks": "Chunks the worker half saved into the tier.",
    "saved_bytes": "Bytes of KV the worker half saved into the tier.",
    "skipped_saves": "Chunk saves skipped because the tier already held (or was receiving) the chunk.",
    "save_errors": "Chunk saves that failed (a future cache miss only).",
    "pushes": "PD pushes queued (by the tier server or from device staging).",
    "device_pushes": "PD pushes queued from device staging (also counted in pushes).",
    "device_loads": "Chunks unpacked from the device landing (also counted in loaded_chunks).",
    # worker half's device path (connector/device_push.py DevicePushStats, device_landing.py LandingStats)
    "device_push_pushes": "Device-path pushes that completed.",
    "device_push_failures": "Device-path pushes that failed.",
    "device_push_refused": "Device-path pushes refused because the push queue was full.",
    "device_push_to_device": "Device-path pushes that landed in the decode worker's device landing.",
    "device_push_fallbacks": "Device-path pushes the device landing refused, sent to the decode tier instead.",
    "device_push_chunks": "Chunks sent by device-path pushes.",
    "device_push_bytes": "Bytes sent by device-path pushes.",
    "landing_landed": "Chunks committed into the device landing.",
    "landing_unpacked": "Chunks a load unpacked from the device landing.",
    "landing_host_copies": "Device-landed chunks copied into the host tier (or found there already).",
    "landing_host_copy_failures": "Device-landed chunks whose copy into the host tier failed.",
    "landing_expired": "Device landing slots freed after their hold time without a load.",
}


def counts_of(stats: Any, prefix: str = "") -> dict[str, int]:
    """A counters dataclass (``SchedulerStats``, ``WorkerStats``, ...) as flat ``{prefix + field: int}``; a dict
    field (``skipped`` by reason) becomes ``{prefix + field + ":" + key: int}``. Non-numeric fields are left out;
    anything but a dataclass instance (None, a test's stand-in) has no counts: ``{}``."""
    out: dict[str, int] = {}
    if not is_dataclass(stats) or isinstance(stats, type):
        return out
    for f in fields(stats):
        v = getattr(stats, f.name)
        if isinstance(v, dict):
            for k, n in list(v.items()):  # copied: another thread may add a key meanwhile
                out[f"{prefix}{f.name}:{k}"] = int(n)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[prefix + f.name] = int(v)
    return out


@dataclass
class PdmeshKVConnectorStats(KVConnectorStats):
    """pdmesh connector counts over an interval: ``data`` maps a counter (:data:`COUNTERS`, ``skipped:<reason>``)
    to how much it grew in the interval (ints >= 0; a missing key is 0).

    Contract (vLLM's ``KVConnectorStats``): ``aggregate`` adds ``other``'s counts into this object and returns it
    (vLLM sums the workers' objects and the scheduler's that way, and the logger sums a log interval);
    ``reduce`` is the interval's non-zero counts, for the log line; ``reset`` empties it; ``is_empty`` is true when
    every count is 0. Picklable and msgpack-serializable (``data`` holds only str -> int)."""

    def __post_init__(self) -> None:
        self.data = {str(k): int(v) for k, v in (self.data or {}).items()}

    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def aggregate(self, other: KVConnectorStats) -> PdmeshKVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + int(v)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: v for k, v in sorted(self.data.items()) if v}

    def count(self, name: str) -> int:
        """One counter's value in this interval (0 when absent)."""
        return self.data.get(name, 0)


class StatsInterval:
    """Turns lifetime totals into interval deltas: :meth:`take` returns what grew since the previous take.

    Not thread-safe by itself: one caller (the half's ``get_kv_connector_stats``) takes; the counters it reads may
    grow in other threads meanwhile (each snapshot reads each int once, so no growth is lost or counted twice)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def take(self, totals: Mapping[str, int]) -> PdmeshKVConnectorStats | None:
        """The growth of ``totals`` since the previous call, or None when nothing grew. A total that went down
        (its counter was recreated, e.g. a restarted device path) counts from 0 again."""
        delta: dict[str, int] = {}
        for k, v in totals.items():
            last = self._last.get(k, 0)
            d = v - last if v >= last else v
            if d:
                delta[k] = d
        self._last = dict(totals)
        return PdmeshKVConnectorStats(data=delta) if delta else None


class PdmeshPromMetrics(KVConnectorPromMetrics):
    """The ``vllm:pdmesh_*`` Prometheus counters, built by ``PdmeshConnector.build_prom_metrics`` in the process
    that serves ``/metrics``, labelled like vLLM's own (``model_name``, ``engine``):

    - ``vllm:pdmesh_<name>_total`` for each name in :data:`COUNTERS` (created at start, so they read 0 before
      the first event);
    - ``vllm:pdmesh_skipped_requests_total{reason=...}``: requests the scheduler half did not key, by reason.

    ``observe`` adds one interval's ``data`` (a ``PdmeshKVConnectorStats.to_dict()``); unknown keys are ignored."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters: dict[str, dict[int, Any]] = {}
        for name, doc in COUNTERS.items():
            counter = self._counter_cls(name=f"vllm:pdmesh_{name}", documentation=doc, labelnames=labelnames)
            self.counters[name] = create_metric_per_engine(counter, per_engine_labelvalues)
        self.skipped = self._counter_cls(
            name="vllm:pdmesh_skipped_requests",
            documentation="Requests the pdmesh connector did not key (no KV load, save, push or wait), by reason.",
            labelnames=[*labelnames, "reason"],
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, n in transfer_stats_data.items():
            if not n or n < 0:
                continue
            if key in self.counters:
                self.counters[key][engine_idx].inc(n)
            elif key.startswith(SKIPPED + ":"):
                reason = key[len(SKIPPED) + 1 :]
                self.skipped.labels(*self.per_engine_labelvalues[engine_idx], reason).inc(n)
