"""``prompt_logprobs``: a request that asks for the prompt's logprobs goes decode-only (the decode worker must
compute every prompt position's logits itself; loaded KV would leave them out)."""

from __future__ import annotations

from pdmesh.router.deciders.base import PDQuestion
from pdmesh.router.openai_requests import needs_prompt_logits


class PromptLogprobs:
    name = "prompt_logprobs"

    def decode_only(self, q: PDQuestion) -> bool:
        return needs_prompt_logits(q.ctx.body)
