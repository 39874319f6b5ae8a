"""The ``pdmesh`` entry of a request's ``kv_transfer_params``: the router's order to the connector.

``{"transfer_id": str, "push_to"?: "host:port", "deadline_ms"?: int, "sig"?: hex, "push_to_device"?: "host:port",
"sig_device"?: hex}``: with ``push_to`` the request
is the prefill leg of a push PD request (:class:`pdmesh.prefiller.push.PushPlan`), without it the decode leg
(:class:`pdmesh.decoder.wait.PushWait`). Only the router sets it.

The field arrives from outside the engine, so it is untrusted input: :meth:`PdParams.from_request` never raises,
and anything malformed is ignored (the request then runs as a plain request, with the tier's prefix reuse only).
A ``push_to`` is honoured only with the router's ``sig`` over ``{transfer_id, push_to, deadline_ms}`` keyed by
the cluster token (:func:`pdmesh.security.push_target_signed`): a client that reaches an engine directly cannot
make it push anywhere. ``push_to_device`` (the decode worker's device landing) likewise needs ``sig_device`` over
``{transfer_id, push_to_device, deadline_ms}``; an unsigned one is dropped alone (the push goes to ``push_to``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from pdmesh.security import push_target_signed

log = logging.getLogger("pdmesh.connector")

DEFAULT_DEADLINE_S = 10.0
MAX_DEADLINE_S = 600.0


@dataclass(frozen=True)
class PdParams:
    transfer_id: str
    push_to: str | None = None  # prefill side: the decode node's receiver address
    deadline_s: float = DEFAULT_DEADLINE_S  # how long the push (prefill) or the wait for it (decode) may take
    push_to_device: str | None = None  # prefill side: the decode worker's device landing, tried first

    @classmethod
    def from_request(cls, kv_transfer_params: Any, token: str = "") -> PdParams | None:
        """The params of a request, or None when absent, malformed or an unsigned push (never raises)."""
        if not isinstance(kv_transfer_params, dict):
            return None
        raw = kv_transfer_params.get("pdmesh")
        if not isinstance(raw, dict) or not isinstance(raw.get("transfer_id"), str):
            return None
        push_to = raw.get("push_to")
        if push_to is not None and not (
            isinstance(push_to, str)
            and push_target_signed(raw.get("sig"), token, raw["transfer_id"], push_to, raw.get("deadline_ms"))
        ):
            log.warning(
                "ignoring kv_transfer_params.pdmesh of transfer %r: push target not signed by the router",
                raw["transfer_id"][:80],
            )
            return None
        deadline_ms = raw.get("deadline_ms", DEFAULT_DEADLINE_S * 1000)
        try:
            deadline_s = float(deadline_ms) / 1000.0
        except (TypeError, ValueError, OverflowError):
            deadline_s = DEFAULT_DEADLINE_S
        if not math.isfinite(deadline_s) or isinstance(deadline_ms, bool):
            deadline_s = DEFAULT_DEADLINE_S
        deadline_s = max(0.0, min(deadline_s, MAX_DEADLINE_S))
        device = raw.get("push_to_device") if isinstance(push_to, str) else None
        if device is not None and not (
            isinstance(device, str)
            and push_target_signed(
                raw.get("sig_device"), token, raw["transfer_id"], device, raw.get("deadline_ms")
            )
        ):
            log.warning(
                "ignoring push_to_device of transfer %r: not signed by the router", raw["transfer_id"][:80]
            )
            device = None
        return cls(raw["transfer_id"], push_to if isinstance(push_to, str) else None, deadline_s, device)
