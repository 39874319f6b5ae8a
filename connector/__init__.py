"""pdmesh.connector: the vLLM KV connector, shaped like vLLM's own (docs/connector.md).

vLLM loads ``pdmesh.connector.vllm_connector.PdmeshConnector`` in every engine process and makes one instance per
role. Folder map:

- ``vllm_connector``: the facade (``KVConnectorBase_V1``): builds the halves and maps vLLM's hooks onto them.
- ``metadata``: ``PdmeshConnectorMetadata``, the per-step plan the scheduler half hands the worker half.
- ``scheduler``: the scheduler half: tier lookups, load and save plans, PD roles per request.
- ``worker``: the worker half: pack/unpack between vLLM's blocks and the tier's shared-memory pool.
- ``tier_client``: the local tier server's client shaped for the two halves.
- ``params``: the router's ``kv_transfer_params.pdmesh``, parsed as untrusted input.

The PD roles it calls live below it: ``pdmesh.prefiller`` (what to push) and ``pdmesh.decoder`` (how to wait).
Nothing is imported here, so ``import pdmesh.connector.params`` never loads vLLM or torch.
"""
