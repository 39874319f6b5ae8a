"""The prefill role: computes prompt KV and hands it to decoders (vLLM ``kv_producer``)."""

from pdmesh.worker_agent import WorkerRole

PREFILL = WorkerRole(name="prefill", kv_role="kv_producer", default_port=8100)
