"""The connector's worker half with the device path on (connector/device_push.py), on CPU: chunks are packed
into a staging region registered with NIXL (DRAM here, VRAM on GPU nodes), pushed from there by a background
thread into a decode tier's receiver in another process, and saved into the local tier from the staging region.
Fallbacks: no room in the staging region -> host path (the tier pushes); a dead peer -> counted, slots freed."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="the connector imports vLLM's connector base classes")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

from pdmesh.connector.device_push import DevicePush
from pdmesh.connector.metadata import ChunkOp, PdmeshConnectorMetadata, PushSpec
from pdmesh.connector.worker import ConnectorWorker
from pdmesh.kernels import bind, get_layout
from pdmesh.transfer.nixl_backend import nixl_available
from tests.connector import _device_procs as dp
from tests.connector.test_connector_worker import MemTier, caches
from tests.kernels.kvhelpers import reference_pack

pytestmark = pytest.mark.skipif(not nixl_available(), reason="nixl (nixl-cu12) not installed")
FP = "pdmesh-kv-v1"
LAYOUT = get_layout("cpu_attn")
KEYS = [b"k" * 16, b"j" * 16, b"i" * 16]
BLOCKS = [[3, 7], [1, 0], [11, 4]]


@pytest.fixture
def decode_tier():
    with dp.pool_receiver(FP) as tier:
        yield tier


def _save(worker: ConnectorWorker, peer: str, tid: str = "t.1") -> None:
    worker.save(PdmeshConnectorMetadata(saves=[ChunkOp("r", KEYS, BLOCKS, PushSpec(tid, peer, 20.0))]))


def test_push_goes_from_device_staging_and_the_tier_gets_the_same_chunks(decode_tier):
    peer, conn = decode_tier
    src, tier = caches(1), MemTier()
    bound = bind(src, LAYOUT)
    push = DevicePush.build(bound, 2, 4, FP, "")
    try:
        w = ConnectorWorker(tier, bound, 2, device_push=push)
        _save(w, peer)
        assert push.drain(60)
        assert (push.stats.pushes, push.stats.failures, push.stats.chunks) == (1, 0, 3)
        assert w.stats.device_pushes == 1 and tier.pushes == []  # not pushed through the tier server
        conn.send(("get", KEYS))
        assert conn.poll(60)
        got = conn.recv()
        for key, ids in zip(KEYS, BLOCKS, strict=True):
            want = reference_pack(src, LAYOUT, ids).numpy().tobytes()
            assert got.get(key) == want, key  # on the decode node
            off, n = tier.where[key]
            assert bytes(tier.buf[off : off + n]) == want, key  # in the local tier, for reuse
        assert tier.ready == set(KEYS) and w.stats.saved_chunks == 3
        assert push.staged.staging.stats().free == 4
    finally:
        push.close()


def test_no_room_in_staging_takes_the_host_path():
    src, tier = caches(1), MemTier()
    bound = bind(src, LAYOUT)
    push = DevicePush.build(bound, 2, 2, FP, "")  # 2 slots for 3 chunks
    try:
        w = ConnectorWorker(tier, bound, 2, device_push=push)
        _save(w, "127.0.0.1:9")
        assert w.stats.device_pushes == 0 and len(tier.pushes) == 1  # the tier server pushes instead
        assert tier.ready == set(KEYS) and push.staged.staging.stats().free == 2
    finally:
        push.close()


def test_dead_peer_fails_the_push_frees_the_slots_and_keeps_the_save():
    src, tier = caches(1), MemTier()
    bound = bind(src, LAYOUT)
    push = DevicePush.build(bound, 2, 4, FP, "")
    try:
        w = ConnectorWorker(tier, bound, 2, device_push=push)
        _save(w, "127.0.0.1:9")  # nothing listens on the discard port
        assert push.drain(60)
        assert push.stats.failures == 1 and push.stats.pushes == 0
        assert push.staged.staging.stats().free == 4 and tier.ready == set(KEYS)
    finally:
        push.close()


def test_the_facade_leaves_the_device_path_off_for_cpu_caches_even_when_asked():
    """vLLM's facade builds a DevicePush only for CUDA caches: on CPU the flag is logged as off, pushes keep the
    host path (and nothing is started)."""
    from types import SimpleNamespace

    from pdmesh.connector.vllm_connector import PdmeshConnector

    fake = SimpleNamespace(
        _kv_transfer_config=SimpleNamespace(kv_connector_extra_config={"device_staging": True})
    )
    assert PdmeshConnector._device_push(fake, bind(caches(1), LAYOUT), 2) is None
