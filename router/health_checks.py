"""Active health checks of static and DNS workers: periodic ``GET <url><path>`` with a timeout.

A worker becomes unhealthy after ``unhealthy_after`` consecutive failed checks (timeout, connection error, non-2xx)
and healthy again after ``healthy_after`` good ones. Self-registered workers are not probed: their heartbeat
is their health signal, and their breaker handles failed legs. Checks of all workers run concurrently, each
bounded by ``timeout_s``, so one round never takes longer than that.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from pdmesh.router.config import HealthCheckConfig
from pdmesh.router.registry import Registry, Worker

log = logging.getLogger("pdmesh.router")


class HealthChecker:
    def __init__(self, cfg: HealthCheckConfig, registry: Registry, client: httpx.AsyncClient) -> None:
        self.cfg = cfg
        self.registry = registry
        self.client = client

    async def check(self, worker: Worker) -> bool:
        try:
            r = await self.client.get(worker.url + self.cfg.path, timeout=self.cfg.timeout_s)
            ok = 200 <= r.status_code < 300
        except httpx.HTTPError:
            ok = False
        changed = self.registry.set_probe(worker, ok, self.cfg.unhealthy_after, self.cfg.healthy_after)
        if changed:
            log.warning("worker %s is %s (active health check)", worker.id, "healthy" if ok else "unhealthy")
        return ok

    async def check_all(self) -> None:
        workers = [w for w in self.registry.all() if w.source != "registered"]
        if workers:
            await asyncio.gather(*(self.check(w) for w in workers))

    async def run(self) -> None:
        """Check forever (cancel to stop)."""
        while True:
            await self.check_all()
            await asyncio.sleep(self.cfg.interval_s)
