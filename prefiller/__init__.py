"""pdmesh.prefiller: the prefill role of push PD — what a prefill worker saves and pushes, when, and to whom.

A prefill leg's path, file by file:

1. ``pdmesh.router.pd_push.prefill_request``: the router sends the prompt with ``max_tokens=1`` and
   ``kv_transfer_params.pdmesh = {transfer_id, push_to: <decode node's transfer receiver>, deadline_ms}``.
2. ``pdmesh.connector.params.PdParams``: the engine's connector parses that (untrusted input; malformed = ignored).
3. ``pdmesh.connector.scheduler``: chunks the local tier already holds are loaded instead of computed; each step's
   completed prompt chunks become a save, and :class:`pdmesh.prefiller.push.PushPlan` (this package) says that
   every prompt chunk is saved (loaded ones too) and gives the save its :class:`~pdmesh.prefiller.push.PushSpec`.
4. ``pdmesh.connector.worker``: packs the blocks into the tier's shared-memory pool (``pdmesh.kernels``), commits
   them, and sends the tier server a ``push`` op (``pdmesh.kvcache.control_ops``).
5. ``pdmesh.kvcache.tier`` / ``transfer_node``: the tier server pushes in a thread with
   ``pdmesh.transfer.sender``: ALLOC on the decode node (leased regions), WRITE (shm, NIXL or TCP), COMMIT.

Modules: ``push`` (``PushPlan``, ``PushSpec``). Pure: no I/O, no vLLM, no torch.
"""
