"""Power of two choices: sample two distinct candidates, take the one with fewer requests in flight."""

from __future__ import annotations

import random

from pdmesh.router.registry import Worker
from pdmesh.router.route_context import RouteContext


class PowerOfTwo:
    name = "power_of_two"
    needs_prompt = False

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: list[Worker], ctx: RouteContext | None = None) -> Worker:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return a if a.in_flight <= b.in_flight else b
