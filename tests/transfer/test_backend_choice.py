"""Which transfer backend a push takes: the default order, forcing one, a backend that cannot start, and where the
choice shows (the node's offered list, per-backend push counts)."""

from __future__ import annotations

import os

import pytest

from pdmesh.kvcache import transfer_node
from pdmesh.kvcache.config import TierConfig
from pdmesh.kvcache.pool import ChunkPool
from pdmesh.kvcache.transfer_node import TransferNode
from pdmesh.transfer.nixl_backend import nixl_available

FP = "test-fp"
SLOT = 64 << 10


def _node(backends: list[str]) -> tuple[TransferNode, ChunkPool]:
    pool = ChunkPool(SLOT, 8)
    node = TransferNode(pool, FP, "secret", backends=backends)
    node.start()
    return node, pool


def _push_one(
    src: TransferNode, src_pool: ChunkPool, dst: TransferNode, dst_pool: ChunkPool, key: bytes
) -> str:
    payload = os.urandom(SLOT)
    assert src_pool.put(key, payload)
    assert dst.address is not None
    result = src.push([key], dst.address, f"t-{key.hex()}", 10.0)
    assert result is not None and result.written == [key]
    assert dst_pool.get(key) == payload  # the bytes arrived intact
    return result.backend


def test_default_order_prefers_shm_then_nixl_when_installed_then_tcp():
    backends = TierConfig.load(None, env={}).transfer.backends
    assert backends == (["shm", "nixl", "tcp"] if nixl_available() else ["shm", "tcp"])
    forced = TierConfig.load(None, env={"PDMESH_TIER_TRANSFER_BACKENDS": "tcp, nixl"}).transfer.backends
    assert forced == ["tcp", "nixl"]


@pytest.mark.parametrize(
    "order, expected",
    [
        (["shm", "tcp"], "shm"),  # same host: shared memory
        (["tcp", "shm"], "tcp"),  # forced order
        pytest.param(
            ["nixl", "tcp"],
            "nixl",
            marks=pytest.mark.skipif(not nixl_available(), reason="nixl not installed"),
        ),
    ],
)
def test_push_takes_the_first_backend_both_sides_can_use_and_counts_it(order, expected):
    a, pa = _node(order)
    b, pb = _node(order)
    try:
        assert a.backends == order  # what each node offers, in order
        assert _push_one(a, pa, b, pb, b"k1") == expected
        assert a.stats.by_backend == {expected: 1}
    finally:
        for n, p in ((a, pa), (b, pb)):
            n.close()
            p.close()


def test_a_backend_that_cannot_start_is_left_out_and_the_next_one_is_used(monkeypatch):
    real = transfer_node._factories

    def broken_first(fingerprint, token, host, advertise, names):
        made = real(fingerprint, token, host, advertise, names)

        def fail():
            raise RuntimeError("no usable transport")

        return {name: (fail if name == names[0] else make) for name, make in made.items()}

    monkeypatch.setattr(transfer_node, "_factories", broken_first)
    a, pa = _node(["shm", "tcp"])
    b, pb = _node(["shm", "tcp"])
    try:
        assert b.backends == ["tcp"]  # shm could not start on the receiver: only tcp is offered
        assert _push_one(a, pa, b, pb, b"k2") == "tcp"  # and the sender (whose shm fails too) takes tcp
    finally:
        for n, p in ((a, pa), (b, pb)):
            n.close()
            p.close()
