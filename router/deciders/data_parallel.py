"""``data_parallel``: the decoder serves both roles and the model has no prefill-only worker: a plain data-parallel
pool, where a prefill leg would only send the prompt to a twin of the decoder."""

from __future__ import annotations

from pdmesh.router.deciders.base import PDQuestion


class DataParallel:
    name = "data_parallel"

    def decode_only(self, q: PDQuestion) -> bool:
        if q.target.info.role != "both":
            return False
        return not any(w.info.role == "prefill" for w in q.st.registry.candidates("prefill", q.ctx.model))
