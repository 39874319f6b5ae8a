"""The decode role: receives prompt KV and generates (vLLM ``kv_consumer``)."""

from pdmesh.worker_agent import WorkerRole

DECODE = WorkerRole(name="decode", kv_role="kv_consumer", default_port=8200)
