"""The policy interface: choose one worker among healthy candidates."""

from __future__ import annotations

from typing import Protocol

from router.registry import Worker


class Policy(Protocol):
    def choose(self, candidates: list[Worker], request: dict) -> Worker:
        """Pick one of ``candidates`` (non-empty, all healthy) for ``request`` (the parsed JSON body).

        Must not block or do I/O; called on the event loop for every leg attempt.
        """
        ...
