"""Per-request helpers of the router state: the policy instances per (model, pool) and request ids."""

from __future__ import annotations

import itertools
import secrets

from pdmesh.router.config import RouterConfig
from pdmesh.router.policies import Policy, make_policy
from pdmesh.router.prefix_index import PrefixIndex


class PolicySet:
    """One policy instance per (model, pool), created on first use from the config."""

    def __init__(self, config: RouterConfig, index: PrefixIndex) -> None:
        self.config = config
        self.index = index
        self._policies: dict[tuple[str, str], Policy] = {}

    def get(self, model: str, role: str) -> Policy:
        key = (model, role)
        policy = self._policies.get(key)
        if policy is None:
            name = self.config.pool_policy(model, role)
            policy = make_policy(name, self.index, self.config.cache_aware.max_load_imbalance)
            self._policies[key] = policy
        return policy


class RequestIds:
    """Request ids unique across processes and restarts: a random 64-bit prefix per instance plus a counter.

    (``uuid4()`` per request costs a getrandom() system call on the hot path.)
    """

    def __init__(self) -> None:
        self._prefix = f"pdm-{secrets.token_hex(8)}-"
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):x}"
