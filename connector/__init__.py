"""pdmesh.connector: the vLLM KV connector, shaped like vLLM's own (docs/connector.md).

vLLM loads ``pdmesh.connector.vllm_connector.PdmeshConnector`` in every engine process and makes one instance per
role. Folder map:

- ``vllm_connector``: the facade (``KVConnectorBase_V1``): builds the halves and maps vLLM's hooks onto them.
- ``metadata``: ``PdmeshConnectorMetadata``, the per-step plan the scheduler half hands the worker half.
- ``scheduler``: the scheduler half: tier lookups, load and save plans, PD roles per request.
- ``worker``: the worker half: pack/unpack between vLLM's blocks and the tier's shared-memory pool.
- ``tier_client``: the local tier server's client shaped for the two halves.
- ``config``: ``ConnectorConfig``, the typed ``kv_connector_extra_config`` (validated once at engine start).
- ``params``: the router's ``kv_transfer_params.pdmesh``, parsed as untrusted input (push grants, used once).
- ``stats``: ``PdmeshKVConnectorStats``, both halves' counts as vLLM's ``KVConnectorStats`` (``vllm:pdmesh_*``).
- ``device_path`` (config, decision, staging sender/receiver), ``device_push`` (prefill: pack on the GPU into a
  NIXL-registered staging region and push from there), ``device_landing`` (decode: receive into device memory and
  unpack into vLLM's blocks): the device path, on with CUDA caches and NIXL.
- ``identity``: a request's input identity (LoRA adapter, ``cache_salt``, multimodal inputs) or why it is not keyed.

The PD roles it calls live below it: ``pdmesh.prefiller`` (what to push) and ``pdmesh.decoder`` (how to wait).
Nothing is imported here, so ``import pdmesh.connector.params`` never loads vLLM or torch.
"""
