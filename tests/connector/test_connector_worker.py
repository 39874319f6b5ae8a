"""The connector's worker half with the real pack/unpack kernels and an in-memory tier."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="the connector imports vLLM's connector base classes")

from pdmesh.connector.metadata import ChunkOp, PdmeshConnectorMetadata, PushSpec
from pdmesh.connector.worker import ConnectorWorker
from pdmesh.kernels import bind, get_layout

NB, H, BS, D2, L = 12, 2, 4, 8, 3


class MemTier:
    """A tier with a bytearray pool: regions handed out bump-style; ready/pinned sets."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.buf = bytearray(size)
        self.next = 0
        self.where: dict[bytes, tuple[int, int]] = {}
        self.ready: set[bytes] = set()
        self.pins: dict[bytes, int] = {}
        self.pushes: list[tuple] = []
        self.fail_acquire = False

    def pool_view(self):
        return memoryview(self.buf)

    def acquire(self, keys):
        if self.fail_acquire:
            raise ConnectionError("down")
        out = []
        for k in keys:
            if k in self.ready:
                self.pins[k] = self.pins.get(k, 0) + 1
                out.append(self.where[k])
            else:
                out.append(None)
        return out

    def release(self, keys):
        for k in keys:
            self.pins[k] -= 1

    def alloc(self, keys, nbytes):
        out = []
        for k in keys:
            if k in self.where:
                out.append(None)
                continue
            self.where[k] = (self.next, nbytes)
            out.append(self.next)
            self.next += nbytes
        return out

    def commit(self, keys):
        self.ready.update(keys)

    def abort(self, keys):
        for k in keys:
            self.where.pop(k, None)

    def push(self, keys, peer, transfer_id, deadline_s):
        self.pushes.append((list(keys), peer, transfer_id))


def caches(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(NB, H, BS, D2, generator=g) for _ in range(L)]


def test_save_then_load_into_other_blocks_of_another_engine():
    tier = MemTier()
    src, dst = caches(1), caches(2)
    dst_before = [t.clone() for t in dst]
    layout = get_layout("cpu_attn")
    w_src = ConnectorWorker(tier, bind(src, layout), blocks_per_chunk=2)
    w_dst = ConnectorWorker(tier, bind(dst, layout), blocks_per_chunk=2)
    keys = [b"k" * 16, b"j" * 16]
    push = PushSpec("t", "h:1", 5.0)
    w_src.save(PdmeshConnectorMetadata(saves=[ChunkOp("r", keys, [[3, 7], [1, 0]], push)]))
    assert tier.ready == set(keys) and tier.pushes == [(keys, "h:1", "t")]
    w_dst.load(PdmeshConnectorMetadata(loads=[ChunkOp("q", keys, [[9, 2], [5, 11]])]))
    for s, d, before in zip(src, dst, dst_before, strict=True):
        for sb, db in ((3, 9), (7, 2), (1, 5), (0, 11)):
            assert torch.equal(s[sb], d[db])
        for untouched in set(range(NB)) - {9, 2, 5, 11}:
            assert torch.equal(d[untouched], before[untouched])
    assert all(v == 0 for v in tier.pins.values())
    assert w_dst.take_load_errors() == set() and w_dst.stats.loaded_chunks == 2
    # Saving the same chunks again is skipped (the tier has them).
    w_dst.save(PdmeshConnectorMetadata(saves=[ChunkOp("q", keys, [[9, 2], [5, 11]])]))
    assert w_dst.stats.skipped_saves == 2 and w_dst.stats.saved_chunks == 0


def test_missing_chunk_fails_it_and_every_later_chunk():
    tier = MemTier()
    src, dst = caches(1), caches(2)
    layout = get_layout("cpu_attn")
    ConnectorWorker(tier, bind(src, layout), 2).save(
        PdmeshConnectorMetadata(saves=[ChunkOp("r", [b"a" * 16, b"c" * 16], [[0, 1], [4, 5]])])
    )
    w = ConnectorWorker(tier, bind(dst, layout), 2)
    w.load(
        PdmeshConnectorMetadata(
            loads=[ChunkOp("q", [b"a" * 16, b"b" * 16, b"c" * 16], [[6, 7], [8, 9], [10, 11]])]
        )
    )
    assert w.take_load_errors() == {8, 9, 10, 11}
    assert w.take_load_errors() == set()
    assert torch.equal(dst[0][6], src[0][0])
    assert all(v == 0 for v in tier.pins.values())


def test_tier_down_on_load_reports_all_blocks():
    tier = MemTier()
    tier.fail_acquire = True
    w = ConnectorWorker(tier, bind(caches(1), get_layout("cpu_attn")), 2)
    w.load(PdmeshConnectorMetadata(loads=[ChunkOp("q", [b"a" * 16], [[1, 2]])]))
    assert w.take_load_errors() == {1, 2}
