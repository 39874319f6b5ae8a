"""``pdmesh status``: what a running cluster looks like, from its router.

Asks the router for its workers (``GET /internal/workers``, needs the cluster token) and each push-mode worker's
tier server for its stats (``GET <tier_url>/stats``, same token), and prints one table. Every call is bounded by
``timeout_s``; a tier that does not answer is shown as such, never waited for.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import httpx

from pdmesh.security import TOKEN_HEADER


@dataclass
class WorkerStatus:
    worker: dict[str, Any]  # the router's view: registration, health, breaker, in-flight
    tier: dict[str, Any] | None  # the tier's /stats, None when it has no tier
    tier_error: str | None = None


class StatusError(Exception):
    """The router could not be asked (down, or a wrong token)."""


def collect(router_url: str, token: str, timeout_s: float = 3.0) -> list[WorkerStatus]:
    headers = {TOKEN_HEADER: token} if token else {}
    with httpx.Client(timeout=timeout_s, trust_env=False, headers=headers) as client:
        try:
            r = client.get(router_url.rstrip("/") + "/internal/workers")
        except httpx.HTTPError as e:
            raise StatusError(f"router {router_url} unreachable: {e}") from None
        if r.status_code in (401, 403):
            raise StatusError("the router refused the cluster token (set PDMESH_CLUSTER_TOKEN or --token)")
        if r.status_code != 200:
            raise StatusError(f"router answered {r.status_code}: {r.text[:200]}")
        out = []
        for w in r.json():
            st = WorkerStatus(w, None)
            if w.get("tier_url"):
                try:
                    t = client.get(w["tier_url"].rstrip("/") + "/stats")
                    t.raise_for_status()
                    st.tier = t.json()
                except (httpx.HTTPError, ValueError) as e:
                    st.tier_error = str(e) or type(e).__name__
            out.append(st)
        return out


def _mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.0f}"


def _row(s: WorkerStatus) -> list[str]:
    w = s.worker
    tier = "-"
    if s.tier_error:
        tier = f"down ({s.tier_error[:40]})"
    elif s.tier:
        mem = s.tier.get("memory", {})
        push = (s.tier.get("transfer") or {}).get("push", {})
        recv = (s.tier.get("transfer") or {}).get("receive", {})
        tier = (
            f"{_mib(mem.get('used_bytes'))}/{_mib(mem.get('capacity_bytes'))} MiB, "
            f"{mem.get('ready', 0)} chunks, hits {mem.get('hits', 0)}, "
            f"pushes {push.get('pushes', 0)} (failed {push.get('failures', 0)}), "
            f"received {recv.get('committed', 0)}"
        )
    return [
        str(w.get("worker_id")),
        str(w.get("role")),
        "yes" if w.get("healthy") else "no",
        str(w.get("breaker")),
        str(w.get("in_flight")),
        str(w.get("url")),
        str(w.get("tier_url") or "-"),
        tier,
    ]


def render(statuses: list[WorkerStatus]) -> str:
    head = ["WORKER", "ROLE", "HEALTHY", "BREAKER", "IN-FLIGHT", "URL", "TIER URL", "TIER"]
    rows = [head] + [_row(s) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:-1])) + "  " + r[-1] for r in rows]
    if not statuses:
        lines.append("(no workers registered)")
    return "\n".join(lines)


def main(router_url: str, token: str, as_json: bool = False, timeout_s: float = 3.0) -> int:
    try:
        statuses = collect(router_url, token, timeout_s)
    except StatusError as e:
        print(f"pdmesh status: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(
            json.dumps([{"worker": s.worker, "tier": s.tier, "tier_error": s.tier_error} for s in statuses])
        )
    else:
        print(render(statuses))
    return 0
