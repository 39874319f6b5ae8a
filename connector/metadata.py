"""What the pdmesh connector's scheduler half tells its worker half, once per engine step.

One :class:`PdmeshConnectorMetadata` per step (vLLM binds it on the worker before the forward pass):
- ``loads``: chunks to copy from the tier's pool into vLLM blocks before the forward pass;
- ``saves``: chunks whose KV is complete after this step, to copy from vLLM blocks into the tier's pool;
- a save may carry a :class:`pdmesh.prefiller.push.PushSpec`: after saving, the tier server pushes those chunks to a decode node.
Chunk keys are computed once, on the scheduler side; a chunk covers ``chunk_tokens // block_size`` whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from pdmesh.prefiller.push import PushSpec

__all__ = ["ChunkOp", "PdmeshConnectorMetadata", "PushSpec"]


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
