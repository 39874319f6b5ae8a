"""Sibling router processes (``processes > 1``): shared registrations and one merged /metrics.

Each router process is a full router with its own registry. A worker's registration, heartbeat or
deregistration reaches one process (the kernel spreads connections over the processes listening with
SO_REUSEPORT); that process applies it and relays it to every sibling over the siblings' unix sockets before it
answers, so once a worker has its reply every process routes to it. A (re)started process copies the registered
workers from a sibling. ``/metrics`` on any process merges every process's metrics.

Contract: every call to a sibling carries the cluster token and is bounded by ``timeout_s``; a sibling that does
not answer (being restarted) is skipped with a debug log: it catches up from the next heartbeat, at most a
heartbeat interval later. The relay marker header only suppresses further relaying; it grants nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.security import TOKEN_HEADER
from router.registration import WorkerRegistration
from router.registry import Registry

log = logging.getLogger("pdmesh.router")

RELAYED_HEADER = "X-PDMesh-Relayed"
LOCAL_METRICS = "/metrics?local=1"


class Peers:
    """The sibling processes of this one, reached over their unix sockets. Owns one httpx client per sibling."""

    def __init__(self, sockets: Iterable[str], token: str, timeout_s: float = 2.0) -> None:
        self.sockets = [s for s in sockets]
        self._headers = {TOKEN_HEADER: token, RELAYED_HEADER: "1"}
        self._clients = [
            httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=path),
                base_url="http://router-peer",
                timeout=timeout_s,
                trust_env=False,
            )
            for path in self.sockets
        ]

    async def _each(self, method: str, path: str, **kw: object) -> list[httpx.Response | None]:
        async def one(client: httpx.AsyncClient) -> httpx.Response | None:
            try:
                r = await client.request(method, path, headers=self._headers, **kw)  # type: ignore[arg-type]
            except httpx.HTTPError as e:
                log.debug("router peer %s did not answer %s %s: %s", client._transport, method, path, e)
                return None
            return r

        return list(await asyncio.gather(*(one(c) for c in self._clients)))

    async def relay_registration(self, body: bytes) -> None:
        await self._each("POST", "/internal/workers", content=body)

    async def relay_deregistration(self, worker_id: str) -> None:
        await self._each("DELETE", f"/internal/workers/{worker_id}")

    async def bootstrap(self, registry: Registry) -> int:
        """Copy the self-registered workers of the first sibling that answers; returns how many."""
        for client in self._clients:
            try:
                r = await client.get("/internal/workers", headers=self._headers)
                r.raise_for_status()
                entries = r.json()
            except (httpx.HTTPError, ValueError):
                continue
            n = 0
            fields = WorkerRegistration.model_fields
            for entry in entries:
                if entry.get("source") != "registered":
                    continue
                registry.upsert(
                    WorkerRegistration.model_validate({k: entry[k] for k in fields if k in entry})
                )
                n += 1
            return n
        return 0

    async def metrics_texts(self) -> list[str]:
        return [
            r.text for r in await self._each("GET", LOCAL_METRICS) if r is not None and r.status_code == 200
        ]

    async def aclose(self) -> None:
        for c in self._clients:
            await c.aclose()


# Gauges that describe a worker (the same fact seen by every process): merged with max, not summed.
_MAX_GAUGES = {"pdmesh_router_worker_healthy", "pdmesh_router_worker_breaker_open", "pdmesh_router_workers"}


def merge_metrics(texts: Iterable[str]) -> bytes:
    """Merge Prometheus text expositions of the router processes into one.

    Counters, histograms and in-flight gauges are summed per series; worker-state gauges take the maximum.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            series = values[fam.name]
            use_max = fam.name in _MAX_GAUGES
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key in series:
                    series[key] = max(series[key], s.value) if use_max else series[key] + s.value
                else:
                    series[key] = s.value
    for name, fam in families.items():
        for (sample, labels), value in values[name].items():
            if sample.endswith("_created"):
                continue  # creation timestamps are per process; they do not merge
            fam.add_sample(sample, dict(labels), value)

    class _Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def peer_socket_paths(directory: str, count: int) -> list[str]:
    """The unix socket path of each router process (index 0..count-1) in the supervisor's private directory."""
    return [str(Path(directory) / f"router-{i}.sock") for i in range(count)]
