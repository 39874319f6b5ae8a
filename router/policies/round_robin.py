"""Round-robin over the current candidates (stable under membership changes: keyed by worker id order)."""

from __future__ import annotations

import itertools

from pdmesh.router.registry import Worker
from pdmesh.router.route_context import RouteContext


class RoundRobin:
    name = "round_robin"
    needs_prompt = False

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: list[Worker], ctx: RouteContext | None = None) -> Worker:
        if len(candidates) == 1:
            return candidates[0]
        ordered = sorted(candidates, key=lambda w: w.id)
        return ordered[next(self._counter) % len(ordered)]
