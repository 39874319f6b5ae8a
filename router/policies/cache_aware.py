"""Cache-aware choice: the candidate holding the longest prefix of the prompt, unless it is overloaded.

Cached prefix per candidate = max(router-side index match (chunks x tokens per chunk), the tier's ``/lookup``
answer in ``ctx.tier_cached``). The longest wins; ties go to fewer requests in flight. Load guard: when the
winner has more than ``max_load_imbalance`` requests in flight beyond the least loaded candidate, the least
loaded one is taken instead (a hot prefix must not pile up on one worker). Without any cached prefix (or
without a prompt analysis) it falls back to power of two choices.
"""

from __future__ import annotations

from pdmesh.router.policies.power_of_two import PowerOfTwo
from pdmesh.router.prefix_index import PrefixIndex
from pdmesh.router.registry import Worker
from pdmesh.router.route_context import RouteContext


def cached_prefix_tokens(index: PrefixIndex, candidates: list[Worker], ctx: RouteContext) -> dict[str, int]:
    """Worker id -> leading prompt tokens it is believed to hold (index and tier lookups combined)."""
    if ctx.prompt is None:
        return {w.id: 0 for w in candidates}
    per_key = ctx.prompt.tokens_per_key
    matched = index.match(ctx.prompt.keys, [w.id for w in candidates])
    return {wid: max(n * per_key, ctx.tier_cached.get(wid, 0)) for wid, n in matched.items()}


class CacheAware:
    name = "cache_aware"
    needs_prompt = True

    def __init__(self, index: PrefixIndex, max_load_imbalance: int = 16, seed: int | None = None) -> None:
        self.index = index
        self.max_load_imbalance = max_load_imbalance
        self._fallback = PowerOfTwo(seed)

    def choose(self, candidates: list[Worker], ctx: RouteContext) -> Worker:
        if len(candidates) == 1:
            return candidates[0]
        cached = cached_prefix_tokens(self.index, candidates, ctx)
        best = max(candidates, key=lambda w: (cached[w.id], -w.in_flight))
        if cached[best.id] == 0:
            return self._fallback.choose(candidates, ctx)
        least = min(candidates, key=lambda w: w.in_flight)
        if best.in_flight - least.in_flight > self.max_load_imbalance:
            return least
        return best
