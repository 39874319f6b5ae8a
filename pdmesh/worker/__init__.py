"""pdmesh.worker: the shared launch of a worker node (``pdmesh prefiller`` / ``pdmesh decoder``).

- ``roles``: the two roles as the launch sees them (name, default port, vLLM ``kv_role`` in NIXL mode).
- ``agent``: the worker agent: starts the node's tier server and vLLM, registers with the router, heartbeats,
  stops both on SIGTERM (deregistering first).
- ``supervision``: ``TierWatch`` and ``EngineWatch``, which restart a dead tier server or vLLM engine (backoff,
  crash-loop limit) while the worker advertises what is down.
- ``vllm_process``: the vLLM OpenAI server subprocess and its kv-transfer-config.
- ``tier_process``: the tier server subprocess, its log and ready line, the chunk size a model needs.

What the roles do inside the engine is ``pdmesh.prefiller`` / ``pdmesh.decoder`` (called by ``pdmesh.connector``).
"""
