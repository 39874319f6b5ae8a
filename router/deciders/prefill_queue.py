"""``prefill_queue``: the prefill legs in flight from this router process hold at least
``max_prefill_queue_tokens`` prompt tokens per prefill worker, so a new prompt would wait behind them while its
decoder could compute it now."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.router.deciders.base import PDQuestion


@dataclass(frozen=True)
class PrefillQueue:
    max_queue_tokens: int  # > 0, per prefill-only worker
    name: str = "prefill_queue"

    def decode_only(self, q: PDQuestion) -> bool:
        queued = q.st.prefill_tokens_in_flight
        if not queued:
            return False
        prefillers = sum(
            1 for w in q.st.registry.candidates("prefill", q.ctx.model) if w.info.role == "prefill"
        )
        return queued >= self.max_queue_tokens * max(1, prefillers)
