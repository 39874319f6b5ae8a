"""``idle_decoder``: the decoder has no request in flight and none on its way (a PD request whose prefill leg
runs), as this router process sees it, and the part of the prompt it must compute (estimated from the body when
the prompt was not analyzed) is at most ``idle_decoder_max_uncached_tokens``: with no stream running there, a
prefill leg would only add its round trip and the push."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.router.deciders.base import PDQuestion
from pdmesh.router.openai_requests import estimate_prompt_tokens


@dataclass(frozen=True)
class IdleDecoder:
    max_uncached_tokens: int  # > 0
    name: str = "idle_decoder"

    def decode_only(self, q: PDQuestion) -> bool:
        if q.target.in_flight or q.target.pd_pending:
            return False
        uncached = estimate_prompt_tokens(q.ctx.body) if q.uncached is None else q.uncached
        return uncached <= self.max_uncached_tokens
