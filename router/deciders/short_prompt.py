"""``short_prompt``: the part of the prompt the decoder must compute is below ``min_uncached_tokens`` (a prefill
leg costs a round trip and a push, more than the decoder computing a few hundred tokens itself)."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.router.deciders.base import PDQuestion


@dataclass(frozen=True)
class ShortPrompt:
    min_uncached_tokens: int  # > 0 (0 turns the rule off: the registry builds no decider)
    name: str = "short_prompt"

    def decode_only(self, q: PDQuestion) -> bool:
        return q.uncached is not None and q.uncached < self.min_uncached_tokens
