"""Cached-prefix lookups in the workers' KV tiers: a pluggable source behind :class:`TierLookup`.

:class:`HttpTierLookup` calls ``POST {tier_url}/lookup {"token_ids": [...]}`` (the tier server's HTTP API,
docs/kvcache.md) with the cluster token and answers the number of leading prompt tokens that tier holds.
Every call is bounded by ``timeout_s``; any error or timeout is ``None`` (unknown), never an exception: the tier
is an optimisation, routing goes on without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import httpx

from pdmesh.router.registry import Worker
from pdmesh.security import TOKEN_HEADER


class TierLookup(Protocol):
    async def cached_tokens(self, worker: Worker, token_ids: Sequence[int], salt: str = "") -> int | None:
        """Leading tokens of the prompt (under the request's ``cache_salt``) held by ``worker``'s tier; None when
        unknown. Never raises."""
        ...


class HttpTierLookup:
    def __init__(self, client: httpx.AsyncClient, cluster_token: str, timeout_s: float) -> None:
        self.client = client
        self.headers = {TOKEN_HEADER: cluster_token} if cluster_token else {}
        self.timeout_s = timeout_s

    async def cached_tokens(self, worker: Worker, token_ids: Sequence[int], salt: str = "") -> int | None:
        url = worker.info.tier_url
        if not url:
            return None
        try:
            r = await self.client.post(
                url.rstrip("/") + "/lookup",
                json={"token_ids": list(token_ids), **({"salt": salt} if salt else {})},
                headers=self.headers,
                timeout=self.timeout_s,
            )
            if r.status_code != 200:
                return None
            n = r.json().get("tokens")
            return int(n) if isinstance(n, int) and n >= 0 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None


async def lookup_all(
    source: TierLookup, workers: list[Worker], token_ids: Sequence[int], salt: str = ""
) -> dict[str, int]:
    """Ask every worker's tier concurrently; returns worker id -> cached tokens for the ones that answered."""
    asked = [w for w in workers if w.info.tier_url]
    if not asked:
        return {}
    answers = await asyncio.gather(*(source.cached_tokens(w, token_ids, salt) for w in asked))
    return {w.id: n for w, n in zip(asked, answers, strict=True) if n}
