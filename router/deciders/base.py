"""The PD decider interface: whether one request skips the prefill leg and goes decode-only on its decoder.

A decider is a small object with a ``name`` (the ``reason`` label of ``pdmesh_router_decode_only_total`` and its
key in the registry) and :meth:`Decider.decode_only`, a pure decision over a :class:`PDQuestion`: no I/O, no
awaiting, no mutation (called on the event loop once per PD request, in registry order; the first that says yes
names the reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pdmesh.router.registry import Worker
    from pdmesh.router.route_context import RouteContext
    from pdmesh.router.state import RouterState


@dataclass(frozen=True)
class PDQuestion:
    """One request's facts a decider reads: the router's state, the request, the decoder chosen for it and the
    part of the prompt that decoder must compute (``uncached``: None when the prompt was not analyzed)."""

    st: RouterState
    ctx: RouteContext
    target: Worker
    uncached: int | None


class Decider(Protocol):
    name: str

    def decode_only(self, q: PDQuestion) -> bool:
        """True when the request should skip the prefill leg. Must not block, do I/O or raise."""
        ...
