"""The policy interface: choose one worker among candidates for one request."""

from __future__ import annotations

from typing import Protocol

from pdmesh.router.registry import Worker
from pdmesh.router.route_context import RouteContext


class Policy(Protocol):
    # The registry name (pdmesh.router.policies.POLICIES), as config and logs say it.
    name: str
    # True when the policy reads ``ctx.prompt`` (the request flow then analyzes the prompt first).
    needs_prompt: bool

    def choose(self, candidates: list[Worker], ctx: RouteContext) -> Worker:
        """Pick one of ``candidates`` (non-empty) for the request described by ``ctx``.

        Must not block or do I/O; called on the event loop for every leg attempt.
        """
        ...
