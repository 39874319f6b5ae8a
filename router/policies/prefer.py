"""Prefer one worker: the decode leg of a push PD request goes to the worker the prefill leg pushed to.

A :class:`~pdmesh.router.policies.base.Policy` built per request (not from the config): it picks ``worker_id``
while it is a candidate and defers to ``fallback`` otherwise (the target failed or left: the decoder then
computes the prompt itself, never a wrong answer).
"""

from __future__ import annotations

from pdmesh.router.policies.base import Policy
from pdmesh.router.registry import Worker
from pdmesh.router.route_context import RouteContext


class Prefer:
    def __init__(self, worker_id: str, fallback: Policy) -> None:
        self.worker_id = worker_id
        self.fallback = fallback
        self.needs_prompt = fallback.needs_prompt
        self.name = f"prefer({fallback.name})"

    def choose(self, candidates: list[Worker], ctx: RouteContext) -> Worker:
        for w in candidates:
            if w.id == self.worker_id:
                return w
        return self.fallback.choose(candidates, ctx)
