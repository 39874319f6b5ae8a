"""Worker selection policies: one module each, all behind :class:`pdmesh.router.policies.base.Policy`.

``base`` (the interface: ``name``, ``needs_prompt``, ``choose``), ``round_robin``, ``power_of_two`` (the less
loaded of two at random), ``cache_aware`` (the longest held prefix, within a load guard), ``session_affinity``
(one conversation to one worker), ``prefer`` (a given worker first, else a fallback policy).

:data:`POLICIES` is the registry the config's choices follow (``policies.prefill`` / ``policies.decode`` and
``model_policies``): a name and a factory per policy. Adding a policy = one module + one line here.
``prefer`` is not in it: the request flow builds it per request (the decode leg of a push PD request).
"""

from __future__ import annotations

from collections.abc import Callable

from pdmesh.router.policies.base import Policy
from pdmesh.router.policies.cache_aware import CacheAware
from pdmesh.router.policies.power_of_two import PowerOfTwo
from pdmesh.router.policies.prefer import Prefer
from pdmesh.router.policies.round_robin import RoundRobin
from pdmesh.router.policies.session_affinity import SessionAffinity
from pdmesh.router.prefix_index import PrefixIndex

__all__ = [
    "POLICIES",
    "CacheAware",
    "Policy",
    "PowerOfTwo",
    "Prefer",
    "RoundRobin",
    "SessionAffinity",
    "make_policy",
]


def _cache_aware(index: PrefixIndex | None, max_load_imbalance: int) -> Policy:
    if index is None:
        raise ValueError("cache_aware needs a prefix index")
    return CacheAware(index, max_load_imbalance)


# name -> factory(prefix index, max load imbalance)
POLICIES: dict[str, Callable[[PrefixIndex | None, int], Policy]] = {
    "round_robin": lambda _index, _imbalance: RoundRobin(),
    "power_of_two": lambda _index, _imbalance: PowerOfTwo(),
    "cache_aware": _cache_aware,
    "session_affinity": lambda _index, _imbalance: SessionAffinity(),
}


def make_policy(name: str, index: PrefixIndex | None = None, max_load_imbalance: int = 16) -> Policy:
    """A new policy instance; ``cache_aware`` needs the shared prefix ``index``."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return factory(index, max_load_imbalance)
