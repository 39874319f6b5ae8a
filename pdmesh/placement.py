"""Which core each engine of a one-machine cluster (``pdmesh up``) is pinned to.

Prefill engines are compute-bound and their time is the requests' time to first token; decode engines batch and
mostly wait between steps. So prefill workers get cores of their own first (core 0, 1, ...); decode workers share
the cores left over, round robin; when prefill workers alone use every core, all engines go round robin over all
cores in start order (prefill workers first). Workers added beyond the planned counts go round robin after them.
:func:`pdmesh.planner.core_sharing` reads the same plan, so the planner predicts the placement that runs.
"""

from __future__ import annotations


def core_plan(prefill: int, decode: int, cores: int) -> tuple[list[int], list[int]]:
    """(core of each prefill worker, core of each decode worker) on a machine of ``cores`` cores."""
    cores = max(1, cores)
    if prefill < cores and decode > 0:
        spare = list(range(prefill, cores))
        return list(range(prefill)), [spare[i % len(spare)] for i in range(decode)]
    order = [i % cores for i in range(prefill + decode)]
    return order[:prefill], order[prefill:]
