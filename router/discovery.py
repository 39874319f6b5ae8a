"""Worker discovery besides self-registration: static lists from the config and DNS names with many replicas.

Both feed the same :class:`router.registry.Registry` (source ``static`` / ``dns``); those workers have no
heartbeat, their liveness comes from :mod:`router.health_checks`.

DNS contract: every ``dns_interval_s`` each name is resolved with the event loop's ``getaddrinfo`` (no thread of
ours, no blocking); each distinct address becomes a worker ``dns:<name>:<port>:<ip>``; addresses that disappear
are removed. A failed resolution keeps the previous set (the health checks decide whether they are alive), so
a DNS blip never empties a pool.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket

from pdmesh.router.config import DiscoveryConfig, DnsTarget, StaticWorker
from pdmesh.router.registration import WorkerRegistration
from pdmesh.router.registry import Registry

log = logging.getLogger("pdmesh.router")

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def _safe_id(raw: str) -> str:
    return _ID_UNSAFE.sub("_", raw)[:128]


def static_registration(w: StaticWorker) -> WorkerRegistration:
    host = w.url.split("://", 1)[1].rstrip("/")
    return WorkerRegistration(
        worker_id=w.worker_id or _safe_id(f"static:{host}"),
        role=w.role,
        url=w.url,
        models=w.models,
        transfer_address=w.transfer_address,
        device_transfer_address=w.device_transfer_address,
        tier_url=w.tier_url,
    )


def dns_registrations(target: DnsTarget, addresses: list[str]) -> list[WorkerRegistration]:
    out = []
    for ip in addresses:
        host = f"[{ip}]" if ":" in ip else ip
        out.append(
            WorkerRegistration(
                worker_id=_safe_id(f"dns:{target.name}:{target.port}:{ip}"),
                role=target.role,
                url=f"{target.scheme}://{host}:{target.port}",
                models=target.models,
                transfer_address=f"{host}:{target.transfer_port}" if target.transfer_port else None,
                tier_url=f"http://{host}:{target.tier_port}" if target.tier_port else None,
            )
        )
    return out


def dns_scope(target: DnsTarget) -> str:
    return _safe_id(f"dns:{target.name}:{target.port}:")


async def resolve(name: str, port: int) -> list[str]:
    """All addresses of ``name`` (deduplicated, sorted). Raises OSError when it does not resolve."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


class Discovery:
    """Owns the static workers and the DNS refresh loop for one registry."""

    def __init__(self, cfg: DiscoveryConfig, registry: Registry) -> None:
        self.cfg = cfg
        self.registry = registry
        self._failing: set[str] = set()

    def load_static(self) -> None:
        self.registry.sync_source("static", [static_registration(w) for w in self.cfg.static])

    async def refresh_dns(self) -> None:
        """Resolve every DNS target once and sync the registry (bounded by the resolver's own timeouts)."""
        for target in self.cfg.dns:
            try:
                addresses = await resolve(target.name, target.port)
            except OSError as e:
                if target.name not in self._failing:
                    log.warning(
                        "DNS discovery: %s does not resolve (%s); keeping the previous set", target.name, e
                    )
                    self._failing.add(target.name)
                continue
            self._failing.discard(target.name)
            regs = dns_registrations(target, addresses)
            gone = self.registry.sync_source("dns", regs, scope=dns_scope(target))
            for wid in gone:
                log.info("DNS discovery: %s removed", wid)

    async def run(self) -> None:
        """Refresh DNS targets forever (cancel to stop)."""
        while True:
            await self.refresh_dns()
            await asyncio.sleep(self.cfg.dns_interval_s)
