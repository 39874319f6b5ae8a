"""Round-robin over the current candidates (stable under membership changes: keyed by worker id order)."""

from __future__ import annotations

import itertools

from router.registry import Worker


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: list[Worker], request: dict) -> Worker:
        ordered = sorted(candidates, key=lambda w: w.id)
        return ordered[next(self._counter) % len(ordered)]
