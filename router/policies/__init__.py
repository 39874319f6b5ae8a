"""Worker selection policies: one module each, all behind :class:`router.policies.base.Policy`."""

from pdmesh.router.policies.base import Policy
from pdmesh.router.policies.cache_aware import CacheAware
from pdmesh.router.policies.power_of_two import PowerOfTwo
from pdmesh.router.policies.round_robin import RoundRobin
from pdmesh.router.policies.session_affinity import SessionAffinity
from pdmesh.router.prefix_index import PrefixIndex

__all__ = ["CacheAware", "Policy", "PowerOfTwo", "RoundRobin", "SessionAffinity", "make_policy"]

POLICY_NAMES = ("round_robin", "power_of_two", "cache_aware", "session_affinity")


def make_policy(name: str, index: PrefixIndex | None = None, max_load_imbalance: int = 16) -> Policy:
    """A new policy instance; ``cache_aware`` needs the shared prefix ``index``."""
    if name == "round_robin":
        return RoundRobin()
    if name == "power_of_two":
        return PowerOfTwo()
    if name == "session_affinity":
        return SessionAffinity()
    if name == "cache_aware":
        if index is None:
            raise ValueError("cache_aware needs a prefix index")
        return CacheAware(index, max_load_imbalance)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
