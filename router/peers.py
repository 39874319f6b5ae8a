"""Sibling router processes (``processes > 1``): shared registrations and one merged /metrics.

Each router process is a full router with its own registry. A worker's registration, heartbeat or
deregistration reaches one process (the kernel spreads connections over the processes listening with
SO_REUSEPORT); that process applies it and relays it to every sibling over the siblings' unix sockets before it
answers, so once a worker has its reply every process routes to it. A (re)started process copies the registered
workers from a sibling. ``/metrics`` on any process shows every process's metrics (a ``router_process`` label each).

Contract: every call to a sibling carries the cluster token and is bounded by ``timeout_s``; a sibling that does
not answer (being restarted) is skipped with a debug log: it catches up from the next heartbeat, at most a
heartbeat interval later. The relay marker header only suppresses further relaying; it grants nothing.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from urllib.parse import quote

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from pdmesh.router.registration import WorkerRegistration
from pdmesh.router.registry import Registry
from pdmesh.security import TOKEN_HEADER

log = logging.getLogger("pdmesh.router")

RELAYED_HEADER = "X-PDMesh-Relayed"
LOCAL_METRICS = "/metrics?local=1"


class Peers:
    """The sibling processes of this one, reached over their unix sockets. Owns one httpx client per sibling."""

    def __init__(
        self,
        own_index: int,
        sockets: dict[int, str],
        token: str,
        timeout_s: float = 2.0,
        copy_registry: bool = False,
    ) -> None:
        """``sockets``: unix socket path of each sibling by process index (``own_index`` excluded).
        ``copy_registry``: this process replaces one that exited; :meth:`bootstrap` copies the siblings'
        registered workers before it serves (at the first start there is nothing to copy)."""
        self.own_index = own_index
        self.copy_registry = copy_registry
        self.indexes = sorted(sockets)
        self._headers = {TOKEN_HEADER: token, RELAYED_HEADER: "1"}
        self._clients = [
            httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=sockets[i]),
                base_url="http://router-peer",
                timeout=timeout_s,
                trust_env=False,
            )
            for i in self.indexes
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
        await self._each("DELETE", f"/internal/workers/{quote(worker_id, safe='')}")

    async def bootstrap(self, registry: Registry, budget_s: float = 5.0) -> int:
        """If ``copy_registry``: copy the self-registered workers the siblings know, asking all of them in
        parallel, again until one answered or ``budget_s`` passed. Returns how many workers were copied."""
        if not self.copy_registry or not self._clients:
            return 0
        loop = asyncio.get_running_loop()
        end = loop.time() + budget_s
        while True:
            replies = await self._each("GET", "/internal/workers", timeout=max(0.1, end - loop.time()))
            answers = [_worker_list(r) for r in replies]
            if any(a is not None for a in answers) or loop.time() >= end:
                break
            await asyncio.sleep(0.2)
        return self._copy([a for a in answers if a], registry)

    @staticmethod
    def _copy(answers: list[list], registry: Registry) -> int:
        fields = WorkerRegistration.model_fields
        seen: set[str] = set()
        for entries in answers:
            for entry in entries:
                if not isinstance(entry, dict) or entry.get("source") != "registered":
                    continue
                try:
                    info = WorkerRegistration.model_validate({k: entry[k] for k in fields if k in entry})
                except ValidationError:
                    continue
                if info.worker_id not in seen:
                    seen.add(info.worker_id)
                    registry.upsert(info)
        return len(seen)

    async def metrics_texts(self) -> dict[int, str | None]:
        """Each sibling's own metrics by process index (None: it did not answer)."""
        replies = await self._each("GET", LOCAL_METRICS)
        return {
            i: r.text if r is not None and r.status_code == 200 else None
            for i, r in zip(self.indexes, replies, strict=True)
        }

    async def aclose(self) -> None:
        for c in self._clients:
            await c.aclose()


def _worker_list(reply: httpx.Response | None) -> list | None:
    """The worker list of a sibling's ``GET /internal/workers`` reply, or None if it gave none."""
    if reply is None or not reply.is_success:
        return None
    try:
        entries = reply.json()
    except ValueError:
        return None
    return entries if isinstance(entries, list) else None


PROCESS_LABEL = "router_process"


def merge_metrics(texts: dict[int, str | None]) -> bytes:
    """One exposition of every router process's metrics: each series gets a ``router_process`` label.

    Series are not summed here: a process that restarts (its counters start again at 0) or does not answer a
    scrape would make a sum go backwards, which Prometheus takes for a counter reset; per-process series reset
    on their own and ``sum by (...)`` in PromQL adds them up correctly. ``pdmesh_router_process_up`` is 1 for
    each process whose metrics are included, 0 for one that did not answer.
    """
    families: dict[str, Metric] = {}
    up = Metric("pdmesh_router_process_up", "1 when the router process answered this scrape", "gauge")
    for index, text in sorted(texts.items()):
        up.add_sample("pdmesh_router_process_up", {PROCESS_LABEL: str(index)}, 0.0 if text is None else 1.0)
        if text is None:
            continue
        for fam in text_string_to_metric_families(text):
            if fam.name.endswith("_created"):
                continue
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for sample in fam.samples:
                if sample.name.endswith("_created"):
                    continue  # creation timestamps of one process
                merged.add_sample(sample.name, {**sample.labels, PROCESS_LABEL: str(index)}, sample.value)
    families[up.name] = up

    class _Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def peer_socket_paths(directory: str, count: int) -> list[str]:
    """The unix socket path of each router process (index 0..count-1) in the supervisor's private directory."""
    return [str(Path(directory) / f"router-{i}.sock") for i in range(count)]
