"""pdmesh.worker: the shared launch of a worker node (``pdmesh prefiller`` / ``pdmesh decoder``).

- ``roles``: the two roles as the launch sees them (name, default port, vLLM ``kv_role`` in NIXL mode).
- ``agent``: the worker agent: starts the node's tier server and vLLM, registers with the router, heartbeats,
  stops both on SIGTERM (deregistering first).
- ``heartbeat``: registration with every router and the heartbeat loop.
- ``cpu_pinning``: a CPU worker (its tier and helpers too) runs on its engine's cores.
- ``shm_leftovers``: removal of the shared-memory segments a killed vLLM leaves behind.
- ``supervision``: ``TierWatch`` and ``EngineWatch``, which restart a dead tier server or vLLM engine while the
  worker advertises what is down, each under its policy of ``pdmesh.restart_policy`` (backoff; the engine's
  crash-loop limit).
- ``vllm_process``: the vLLM OpenAI server subprocess and its kv-transfer-config.
- ``served_models``: the models the engine serves now (base and LoRA adapters, runtime-loaded too), for heartbeats.
- ``tier_process``: the tier server subprocess, its log and ready line, the chunk size a model needs.

What the roles do inside the engine is ``pdmesh.prefiller`` / ``pdmesh.decoder`` (called by ``pdmesh.connector``).
"""
