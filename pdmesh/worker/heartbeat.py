"""Registration with every router: the worker agent's heartbeat loop.

Which routers (:class:`RouterTargets`): ``--router`` / ``PDMESH_ROUTER_URL`` is one URL or a comma-separated list.
An ``http`` URL whose host name resolves to several addresses of one family (Kubernetes: a headless Service over
the router pods) stands for one router per address, so that every router pod holds the whole registry — a router
behind a plain Service would get only the heartbeats its load balancer happens to send it. Only addresses of the
first answer's family count (``localhost`` -> ``::1`` + ``127.0.0.1`` is one router); a name resolving to one
address, and every ``https`` URL (its certificate names the host), is used as written. Names are resolved on the
event loop (``getaddrinfo``, 2 s bound) at most every ``resolve_interval_s``; a failed resolution keeps the last
known addresses (a DNS blip never drops a router). Registration is idempotent (keyed by ``worker_id``): two
addresses of one router cost a duplicate heartbeat, nothing else.

The loop (:func:`heartbeat_until_stopped`): each router has its own state (registered, backoff, next beat) and
its own in-flight call; a router that is down, hangs or refuses delays neither the others nor the 0.5 s engine
check. A router that leaves the resolution is no longer told anything (its registration expires by its TTL).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from pdmesh.router.registration import WorkerRegistration
from pdmesh.security import TOKEN_HEADER, cluster_token_from_env
from pdmesh.worker.served_models import ServedModels
from pdmesh.worker.supervision import CrashLoop, EngineWatch, TierWatch

log = logging.getLogger("pdmesh.worker")

Resolver = Callable[[str, int], Awaitable[list[str]]]
RESOLVE_TIMEOUT_S = 2.0


async def resolve_host(host: str, port: int) -> list[str]:
    """The distinct IP addresses ``host`` resolves to (TCP), in the resolver's order; raises ``OSError`` or
    ``TimeoutError`` after at most :data:`RESOLVE_TIMEOUT_S`."""
    infos = await asyncio.wait_for(
        asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _with_host(url: str, address: str) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")


class RouterTargets:
    """The router base URLs to register with, from ``spec`` (one URL or a comma-separated list)."""

    def __init__(self, spec: str, resolve: Resolver = resolve_host, resolve_interval_s: float = 5.0) -> None:
        self.urls = [u.strip().rstrip("/") for u in spec.split(",") if u.strip()]
        if not self.urls:
            raise ValueError("no router URL given")
        for u in self.urls:
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"router URL must be http(s)://host[:port]: {u!r}")
        self._resolve = resolve
        self._interval = resolve_interval_s
        self._known: dict[str, list[str]] = {u: [u] for u in self.urls}  # URL as given -> targets
        self._resolved_at: float | None = None

    async def current(self) -> list[str]:
        """Every router to heartbeat now (re-resolving host names when due; never raises)."""
        now = asyncio.get_running_loop().time()
        if self._resolved_at is None or now - self._resolved_at >= self._interval:
            self._resolved_at = now
            for url in self.urls:
                self._known[url] = await self._expand(url)
        return list(dict.fromkeys(t for url in self.urls for t in self._known[url]))

    async def _expand(self, url: str) -> list[str]:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if _is_ip(host) or parts.scheme == "https":
            return [url]
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = await self._resolve(host, port)
        except (OSError, TimeoutError, asyncio.TimeoutError) as e:
            log.warning("cannot resolve router host %s (%s); keeping %s", host, e, self._known[url])
            return self._known[url]
        v6 = bool(addresses) and ":" in addresses[0]
        addresses = [a for a in addresses if (":" in a) == v6]  # one family: dual-stack names are one router
        if len(addresses) <= 1:
            return [url]
        return [_with_host(url, a) for a in addresses]


@dataclass
class _Peer:
    registered: bool = False
    contacted: bool = False  # told something since the last deregistration: may hold the registration
    backoff: float = 0.5
    next_beat: float = 0.0
    interval: float = 2.0
    call: asyncio.Task | None = None  # the heartbeat in flight


async def heartbeat_until_stopped(
    engine: EngineWatch,
    reg: WorkerRegistration,
    routers: str | RouterTargets,
    stop: asyncio.Event,
    tier: TierWatch | None = None,
    served: ServedModels | None = None,
) -> int:
    """Register with every router and heartbeat until ``stop`` is set (returns 0); deregisters on the way out.

    The engine is checked every 0.5 s: while it is down (``engine.serving()`` False: it is being restarted) the
    worker is deregistered everywhere; it registers again once the engine is healthy. :class:`CrashLoop` from the
    engine watch propagates after deregistering. A router that is unreachable or refuses is retried with
    exponential backoff (0.5 s doubling to 10 s), each failure logged; the others keep their own rhythm (the
    interval each router asks for). Each HTTP call has a 5 s timeout (2 s to connect; 2 s for a deregistration,
    sent to every router told anything since the last one, in parallel). With ``tier``, each heartbeat carries
    the tier's current addresses (none while it is down); with ``served``, the models the engine serves now (LoRA
    adapters loaded at run time included).
    """
    targets = routers if isinstance(routers, RouterTargets) else RouterTargets(routers)
    headers = {TOKEN_HEADER: cluster_token_from_env()}
    peers: dict[str, _Peer] = {}
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(5.0, connect=2.0), headers=headers, trust_env=False
    ) as client:

        async def settle(calls: list[asyncio.Task]) -> None:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)

        async def deregister_all() -> None:
            await settle([p.call for p in peers.values() if p.call is not None])
            told = [url for url, p in peers.items() if p.contacted]
            await asyncio.gather(*(_deregister(client, url, reg.worker_id) for url in told))
            for url in peers:
                peers[url] = _Peer()

        async def beat(url: str, peer: _Peer, body: str) -> None:
            try:
                r = await client.post(f"{url}/internal/workers", content=body)
                r.raise_for_status()
                peer.interval = float(r.json().get("heartbeat_interval_s", peer.interval))
                if not peer.registered:
                    log.info("registered with router %s as %s", url, reg.worker_id)
                peer.registered, peer.backoff, wait = True, 0.5, peer.interval
            except httpx.HTTPStatusError as e:
                log.error(
                    "router %s refused registration: %s %s",
                    url,
                    e.response.status_code,
                    e.response.text[:300],
                )
                peer.registered, wait = False, peer.backoff
                peer.backoff = min(peer.backoff * 2, 10.0)
            except (httpx.HTTPError, ValueError) as e:
                log.warning(
                    "router %s unreachable (%s); retrying in %.1fs", url, type(e).__name__, peer.backoff
                )
                peer.registered, wait = False, peer.backoff
                peer.backoff = min(peer.backoff * 2, 10.0)
            finally:
                peer.call = None
            peer.next_beat = loop.time() + wait

        try:
            while not stop.is_set():
                try:
                    serving = await engine.serving()
                except CrashLoop:
                    await deregister_all()
                    raise
                if not serving:
                    if any(p.contacted for p in peers.values()):
                        await deregister_all()
                else:
                    current = await targets.current()
                    gone = [url for url in peers if url not in current]
                    await settle([c for url in gone if (c := peers.pop(url).call) is not None])
                    for url in current:
                        peers.setdefault(url, _Peer())
                    due = [(u, p) for u, p in peers.items() if p.call is None and loop.time() >= p.next_beat]
                    if due:
                        if tier is not None:
                            reg = await tier.advertised(reg)
                        if served is not None:
                            reg = await served.refresh(reg, client)
                        body = reg.model_dump_json()
                        for url, peer in due:
                            peer.contacted = True
                            peer.call = asyncio.create_task(beat(url, peer, body))
                # the engine is checked every 0.5 s, each router told at its own interval
                idle = [p.next_beat for p in peers.values() if p.call is None]
                tick = (
                    max(0.05, min(0.5, min(idle, default=loop.time() + 0.5) - loop.time()))
                    if serving
                    else 0.5
                )
                try:
                    await asyncio.wait_for(stop.wait(), timeout=tick)
                except asyncio.TimeoutError:
                    pass
            log.info("stopping worker %s", reg.worker_id)
            await deregister_all()
        finally:
            await settle(
                [p.call for p in peers.values() if p.call is not None]
            )  # e.g. cancelled from outside
    return 0


async def _deregister(client: httpx.AsyncClient, router: str, worker_id: str) -> None:
    try:
        await client.delete(f"{router}/internal/workers/{worker_id}", timeout=2.0)
    except httpx.HTTPError as e:
        log.warning("could not deregister from router %s: %s", router, e)
