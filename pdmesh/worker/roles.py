"""The two worker roles a node can run, as the worker launch sees them.

What a role *does* lives in its own package (``pdmesh.prefiller``: what is saved and pushed, when, to whom;
``pdmesh.decoder``: waiting for pushed chunks until the deadline, then falling back). This module only names
the role for the launch: its registration name, its default port and, for the stock NIXL pull mode, vLLM's
``kv_role``. In push mode (the default) both roles load the pdmesh connector as ``kv_both``: a prefill worker
also loads chunks its tier already holds, and a decode worker also saves what it generates.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerRole:
    name: str  # "prefill" | "decode": the role the worker registers with
    default_port: int  # the vLLM server's default port
    nixl_kv_role: str  # vLLM ``kv_role`` in the stock NIXL pull mode (``--pd-mode nixl``)


PREFILL = WorkerRole(name="prefill", default_port=8100, nixl_kv_role="kv_producer")
DECODE = WorkerRole(name="decode", default_port=8200, nixl_kv_role="kv_consumer")
ROLES = {r.name: r for r in (PREFILL, DECODE)}
