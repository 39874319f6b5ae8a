"""What the pdmesh connector's scheduler half tells its worker half, once per engine step.

One :class:`PdmeshConnectorMetadata` per step (vLLM binds it on the worker before the forward pass):
- ``loads``: chunks to copy from the tier's pool into vLLM blocks before the forward pass;
- ``saves``: chunks whose KV is complete after this step, to copy from vLLM blocks into the tier's pool;
- a save may carry a :class:`pdmesh.prefiller.push.PushSpec`: after saving, the tier server pushes those chunks to a decode node.
Chunk keys are computed once, on the scheduler side; a chunk covers ``chunk_tokens // block_size`` whole blocks.
An engine of several shards (tensor ranks x pipeline stages) runs one worker half per shard, each on
:func:`for_shard` of the step's metadata: its own part of each chunk under its own key, pushed in a transfer of its
own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from pdmesh.kvcache.keys import shard_keys
from pdmesh.prefiller.push import PushSpec

__all__ = ["ChunkOp", "PdmeshConnectorMetadata", "PushSpec", "for_shard"]


@dataclass(frozen=True)
class ChunkOp:
    """One request's chunks for one direction: ``keys[i]`` covers ``block_ids[i]`` (whole blocks, in order)."""

    req_id: str
    keys: list[bytes]
    block_ids: list[list[int]]
    push: PushSpec | None = None


@dataclass
class PdmeshConnectorMetadata(KVConnectorMetadata):
    loads: list[ChunkOp] = field(default_factory=list)
    saves: list[ChunkOp] = field(default_factory=list)


def for_shard(meta: PdmeshConnectorMetadata, shard: int, shards: int) -> PdmeshConnectorMetadata:
    """The step as worker process ``shard`` of ``shards`` performs it: each op's keys are its shard keys
    (:func:`pdmesh.kvcache.keys.shard_keys`) and a push's transfer id gains ``.s<shard>`` (the shards push
    concurrently to one receiver, which refuses a transfer id already committed or leased by another connection).
    ``meta`` itself when the engine has one shard."""
    if shards <= 1:
        return meta

    def op_for(op: ChunkOp) -> ChunkOp:
        push = op.push
        if push is not None:
            push = replace(push, transfer_id=f"{push.transfer_id}.s{shard}")
        return replace(op, keys=shard_keys(op.keys, shard, shards), push=push)

    return PdmeshConnectorMetadata(
        loads=[op_for(op) for op in meta.loads], saves=[op_for(op) for op in meta.saves]
    )
