"""The ``pdmesh`` entry of a request's ``kv_transfer_params``: the router's order to the connector.

``{"transfer_id": str, "push_to"?: "host:port", "deadline_ms"?: number}``: with ``push_to`` the request is the
prefill leg of a push PD request (:class:`pdmesh.prefiller.push.PushPlan`), without it the decode leg
(:class:`pdmesh.decoder.wait.PushWait`). Only the router sets it.

The field arrives from outside the engine, so it is untrusted input: :func:`parse_pd_params` never raises, and
anything malformed is ignored (the request then runs as a plain request, with the tier's prefix reuse only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_DEADLINE_S = 10.0
MAX_DEADLINE_S = 600.0


@dataclass(frozen=True)
class PdParams:
    transfer_id: str
    push_to: str | None = None  # prefill side: the decode node's receiver address
    deadline_s: float = DEFAULT_DEADLINE_S  # how long the push (prefill) or the wait for it (decode) may take

    @classmethod
    def from_request(cls, kv_transfer_params: Any) -> PdParams | None:
        """The params of a request, or None when absent or malformed (never raises)."""
        if not isinstance(kv_transfer_params, dict):
            return None
        raw = kv_transfer_params.get("pdmesh")
        if not isinstance(raw, dict) or not isinstance(raw.get("transfer_id"), str):
            return None
        push_to = raw.get("push_to")
        deadline_ms = raw.get("deadline_ms", DEFAULT_DEADLINE_S * 1000)
        try:
            deadline_s = float(deadline_ms) / 1000.0
        except (TypeError, ValueError, OverflowError):
            deadline_s = DEFAULT_DEADLINE_S
        if not math.isfinite(deadline_s) or isinstance(deadline_ms, bool):
            deadline_s = DEFAULT_DEADLINE_S
        deadline_s = max(0.0, min(deadline_s, MAX_DEADLINE_S))
        return cls(raw["transfer_id"], push_to if isinstance(push_to, str) else None, deadline_s)
