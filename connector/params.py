"""The ``pdmesh`` entry of a request's ``kv_transfer_params``: the router's order to the connector.

Decode leg: ``{"transfer_id": str, "deadline_ms"?: int}`` (:class:`pdmesh.decoder.wait.PushWait`). Prefill leg: the
router's push grant, :func:`pdmesh.security.push_grant` (``push_to``, ``expires_ms``, ``nonce``, ``prompt``?,
``sig``, ``push_to_device``?, ``sig_device``?), for :class:`pdmesh.prefiller.push.PushPlan`. Only the router sets it.

The field arrives from outside the engine, so it is untrusted input: :meth:`PdParams.from_request` never raises,
and anything malformed is ignored (the request then runs as a plain request, with the tier's prefix reuse only).
A ``push_to`` is honoured only under a grant that :func:`pdmesh.security.push_grant_refusal` accepts: signed with
the cluster token, not expired, bound to this request's prompt (when the router knew its tokens), and never seen
before by this engine (:class:`SeenGrants`): a client that reaches an engine directly, or replays a leaked grant,
cannot make it push anywhere. ``push_to_device`` needs its own signature (``sig_device``); an unsigned one is
dropped alone (the push goes to ``push_to``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pdmesh.security import PUSH_DEVICE_KIND, PUSH_GRANT_SKEW_MS, PUSH_KIND, push_grant_refusal

log = logging.getLogger("pdmesh.connector")

DEFAULT_DEADLINE_S = 10.0
MAX_DEADLINE_S = 600.0


class SeenGrants:
    """Signatures of push grants already honoured, until they expire: each grant is used once. Bounded: past
    ``capacity`` the oldest entry goes (a grant that old has expired in any realistic load: 65,536 prefill legs
    within one deadline). Thread-safe."""

    def __init__(self, capacity: int = 65_536) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def first_use(self, sig: str, expires_ms: int, now_ms: int) -> bool:
        """Record ``sig``; False when it was recorded before (a replay)."""
        with self._lock:
            while self._seen and next(iter(self._seen.values())) + PUSH_GRANT_SKEW_MS < now_ms:
                self._seen.popitem(last=False)
            if sig in self._seen:
                return False
            self._seen[sig] = expires_ms
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
            return True


@dataclass(frozen=True)
class PdParams:
    transfer_id: str
    push_to: str | None = None  # prefill side: the decode node's receiver address
    deadline_s: float = DEFAULT_DEADLINE_S  # how long the push (prefill) or the wait for it (decode) may take
    push_to_device: str | None = None  # prefill side: the decode worker's device landing, tried first

    @classmethod
    def from_request(
        cls,
        kv_transfer_params: Any,
        token: str = "",
        prompt_ids: Sequence[int] | None = None,
        seen: SeenGrants | None = None,
        now_ms: int | None = None,
    ) -> PdParams | None:
        """The params of a request, or None when absent, malformed or a push under a grant that is refused
        (unsigned, expired, for another prompt, replayed). Never raises."""
        if not isinstance(kv_transfer_params, dict):
            return None
        raw = kv_transfer_params.get("pdmesh")
        if not isinstance(raw, dict) or not isinstance(raw.get("transfer_id"), str):
            return None
        now = int(time.time() * 1000) if now_ms is None else now_ms
        push_to = raw.get("push_to")
        if push_to is not None:
            why = push_grant_refusal(raw, token, PUSH_KIND, prompt_ids, now)
            # keyed on the decoded proof: another spelling of the same hex is the same grant
            if (
                why is None
                and seen is not None
                and not seen.first_use(bytes.fromhex(raw["sig"]).hex(), raw["expires_ms"], now)
            ):
                why = "grant already used"
            if why is not None:
                log.warning(
                    "ignoring kv_transfer_params.pdmesh of transfer %r: push grant refused (%s)",
                    raw["transfer_id"][:80],
                    why,
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
        if (
            device is not None
            and push_grant_refusal(raw, token, PUSH_DEVICE_KIND, prompt_ids, now) is not None
        ):
            log.warning(
                "ignoring push_to_device of transfer %r: not signed by the router", raw["transfer_id"][:80]
            )
            device = None
        return cls(raw["transfer_id"], push_to if isinstance(push_to, str) else None, deadline_s, device)
