"""pdmesh.decoder: the decode role of push PD — wait for the pushed chunks until the deadline, then fall back.

A decode leg's path, file by file:

1. ``pdmesh.router.pd_push.decode_request``: the router sends the client's request to the node the prefill
   worker pushes to, with ``kv_transfer_params.pdmesh = {transfer_id, deadline_ms}``.
2. ``pdmesh.transfer.receiver`` (in the node's tier server): pushed chunks land in leased regions of the tier's
   pool and become ready on COMMIT.
3. ``pdmesh.connector.scheduler``: looks the prompt's chunk keys up in the local tier each time vLLM considers
   the request, and asks :class:`pdmesh.decoder.wait.PushWait` (this package) whether to keep the request waiting
   (vLLM runs other requests meanwhile) or to load: all chunks ready, or the deadline passed (fallback: load what
   arrived, compute the rest; never wrong output, never a hang).
4. ``pdmesh.connector.worker``: unpacks the ready chunks from the pool into vLLM's blocks before the forward pass.
5. ``PushWait.report``: the response's ``kv_transfer_params.pdmesh = {transfer_id, loaded_tokens, fallback}``,
   which the router counts.

Modules: ``wait`` (``PushWait``). Pure: no I/O, no vLLM, no torch.
"""
