"""Worker selection policies: one module each, all behind :class:`router.policies.base.Policy`."""

from router.policies.base import Policy
from router.policies.round_robin import RoundRobin

__all__ = ["Policy", "RoundRobin", "make_policy"]


def make_policy(name: str) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    raise ValueError(f"unknown policy {name!r}")
