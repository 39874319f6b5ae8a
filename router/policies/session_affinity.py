"""Session affinity: the same session key goes to the same worker while it is a candidate.

Rendezvous (highest random weight) hashing of blake2b(session key, worker id): no state, and when a worker
leaves only its own sessions move. Requests without a session key use power of two choices.
"""

from __future__ import annotations

from hashlib import blake2b

from pdmesh.router.policies.power_of_two import PowerOfTwo
from pdmesh.router.registry import Worker
from pdmesh.router.route_context import RouteContext


def _weight(session: bytes, worker_id: str) -> bytes:
    return blake2b(session + b"\0" + worker_id.encode(), digest_size=8).digest()


class SessionAffinity:
    name = "session_affinity"
    needs_prompt = False

    def __init__(self, seed: int | None = None) -> None:
        self._fallback = PowerOfTwo(seed)

    def choose(self, candidates: list[Worker], ctx: RouteContext) -> Worker:
        if not ctx.session_key:
            return self._fallback.choose(candidates, ctx)
        session = ctx.session_key.encode()
        return max(candidates, key=lambda w: _weight(session, w.id))
