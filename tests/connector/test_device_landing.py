"""The decode side of the device path (connector/device_landing.py), on CPU: pushes land in a staging region
registered with NIXL (DRAM here, VRAM on GPU nodes) owned by the "vLLM worker" (this process), are copied into the
host tier off the request's path, and the worker half unpacks them straight into paged caches, bit for bit (torch
and the Triton interpreter). Slots are freed after unpack + host copy, or after the hold time; a full landing
refuses the push at ALLOC and the prefill side's device push then goes to the decode tier's host pool."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

pytest.importorskip("vllm", reason="the connector imports vLLM's connector base classes")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

from pdmesh.connector.device_landing import DeviceLanding, landed_in_process, landing_for
from pdmesh.connector.device_push import DevicePush
from pdmesh.connector.metadata import ChunkOp, PdmeshConnectorMetadata, PushSpec
from pdmesh.connector.worker import ConnectorWorker
from pdmesh.kernels import bind, get_layout, triton_impl
from pdmesh.transfer.errors import PoolExhausted
from pdmesh.transfer.nixl_backend import nixl_available
from pdmesh.transfer.receiver import ReceiverConfig
from tests.connector import _device_procs as dp
from tests.connector.test_connector_worker import MemTier
from tests.connector.test_device_path import CPU_CASE, FA_CASE, NO_CUDA, NO_TRITON
from tests.kernels.kvhelpers import block_bytes, reference_pack, same_bytes

pytestmark = pytest.mark.skipif(not nixl_available(), reason="nixl (nixl-cu12) not installed")
FP = "model=tiny;dtype=any;layout=test;bs=4;tp=0/1;fmt=1"
BPC = dp.BLOCKS_PER_CHUNK
IMPLS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_impl.HAVE_TRITON, reason=NO_TRITON)),
]


def _landing(case, impl, slots, tier, hold_s=30.0, device="cpu", seed=2):
    """A landing over fresh caches (``seed``) of ``case`` and the caches, its receiver not started."""
    layout = case[0]
    caches = dp.make_caches(*case, seed, device)
    packer = dp.ForcedImpl(bind(caches, get_layout(layout)), impl)
    landing = DeviceLanding.build(packer, BPC, slots, tier, ReceiverConfig(fingerprint=FP), hold_s=hold_s)
    return landing, caches


def _land(landing: DeviceLanding, key: bytes, data: torch.Tensor) -> None:
    """What the receiver does for one chunk of a push: ALLOC (a leased slot), the one-sided WRITE, COMMIT."""
    st = landing.staging
    st.alloc(key, data.numel(), time.monotonic() + 10)
    st.view(key).copy_(data)
    st.commit(key)


def _until(pred, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _check_moved(src, dst, before, layout, moves: dict[int, int]) -> None:
    """dst block d holds src block moves[d]; every other block of dst is unchanged."""
    lay = get_layout(layout)
    for s_t, d_t, b_t in zip(src, dst, before, strict=True):
        for blk in range(9):  # the cases' caches have 9 blocks
            want = block_bytes(s_t, lay, moves[blk]) if blk in moves else block_bytes(b_t, lay, blk)
            assert same_bytes(block_bytes(d_t, lay, blk), want), blk


def _moves(src_ids, dst_ids) -> dict[int, int]:
    return {d: s for si, di in zip(src_ids, dst_ids, strict=True) for s, d in zip(si, di, strict=True)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [CPU_CASE, FA_CASE], ids=lambda c: c[0])
def test_landed_chunks_go_to_the_host_tier_and_unpack_bit_exact_then_free_their_slots(case, impl):
    layout = case[0]
    src = dp.make_caches(*case, 1, "cpu")
    tier = MemTier()
    landing, dst = _landing(case, impl, 4, tier)
    before = [t.clone() for t in dst]
    keys, src_ids, dst_ids = [b"c0", b"c1", b"c2"], [[3, 7], [1, 0], [8, 4]], [[0, 8], [5, 2], [6, 1]]
    landing._thread.start()  # the copy thread (start() would also start the receiver: not needed here)
    try:
        for k, ids in zip(keys, src_ids, strict=True):
            _land(landing, k, reference_pack(src, get_layout(layout), ids).view(-1))
        assert landing.landed([*keys, b"nope"]) == [True, True, True, False]
        assert _until(lambda: landing.stats.host_copies == 3)
        for k, ids in zip(keys, src_ids, strict=True):  # the host tier's copy, for reuse
            off, n = tier.where[k]
            assert (
                bytes(tier.buf[off : off + n])
                == reference_pack(src, get_layout(layout), ids).numpy().tobytes()
            )
        assert tier.ready == set(keys)
        # the worker half: landed chunks load from the landing, the tier is not asked for them
        other = MemTier()
        w = ConnectorWorker(other, landing.staged.packer, BPC, landing=landing)
        w.load(PdmeshConnectorMetadata(loads=[ChunkOp("r", keys, dst_ids)]))
        assert (w.stats.loaded_chunks, w.stats.device_loads, w.stats.load_errors) == (3, 3, 0)
        assert other.pins == {} and w.take_load_errors() == set()
        _check_moved(src, dst, before, layout, _moves(src_ids, dst_ids))
        assert landing.staging.stats().free == 4 and landing.landed(keys) == [False] * 3
    finally:
        landing.close()


def test_load_mixes_landed_and_tier_chunks_and_stops_at_a_missing_one():
    src = dp.make_caches(*CPU_CASE, 1, "cpu")
    lay = get_layout(CPU_CASE[0])
    landing, dst = _landing(CPU_CASE, "torch", 4, None)  # no host tier: nothing is copied
    before = [t.clone() for t in dst]
    tier = MemTier()
    w = ConnectorWorker(tier, landing.staged.packer, BPC, landing=landing)
    try:
        _land(landing, b"a", reference_pack(src, lay, [3, 7]).view(-1))
        off = tier.alloc([b"b"], w.chunk_nbytes)[0]
        tier.buf[off : off + w.chunk_nbytes] = reference_pack(src, lay, [1, 0]).numpy().tobytes()
        tier.commit([b"b"])
        ops = ChunkOp("r", [b"a", b"b", b"gone", b"later"], [[0, 8], [5, 2], [6, 1], [3, 4]])
        w.load(PdmeshConnectorMetadata(loads=[ops]))
        assert (w.stats.loaded_chunks, w.stats.device_loads, w.stats.load_errors) == (2, 1, 2)
        assert w.take_load_errors() == {6, 1, 3, 4}  # the missing chunk and every later one: recomputed
        assert tier.pins == {b"b": 0}  # pinned for the load, released after it
        _check_moved(src, dst, before, CPU_CASE[0], _moves([[3, 7], [1, 0]], [[0, 8], [5, 2]]))
        # no host copy here (no tier): the slot is freed after its unpack all the same
        assert landing.staging.stats().free == 4
    finally:
        landing.close()


def test_unused_landed_chunks_are_freed_after_the_hold_time_and_stay_in_the_tier():
    src = dp.make_caches(*CPU_CASE, 1, "cpu")
    tier = MemTier()
    landing, _ = _landing(CPU_CASE, "torch", 2, tier, hold_s=0.3)
    landing._thread.start()
    try:
        _land(landing, b"a", reference_pack(src, get_layout(CPU_CASE[0]), [3, 7]).view(-1))
        assert landing.staging.stats().reading == 1  # claimed by the landing: the receiver cannot reuse it
        assert _until(lambda: landing.staging.stats().free == 2, 5.0)
        assert landing.stats.expired == 1 and landing.stats.host_copies == 1 and tier.ready == {b"a"}
        assert landing.landed([b"a"]) == [False]
    finally:
        landing.close()


def test_a_full_landing_refuses_at_alloc_and_a_late_unpack_is_a_miss():
    landing, _ = _landing(CPU_CASE, "torch", 1, None)
    try:
        _land(landing, b"a", torch.zeros(landing.staged.chunk_nbytes, dtype=torch.uint8))
        with pytest.raises(PoolExhausted):
            landing.staging.alloc(b"b", landing.staged.chunk_nbytes, time.monotonic() + 1)
        assert landing.unpack(b"b", [0, 1]) is False
    finally:
        landing.close()


def test_the_scheduler_half_finds_the_landing_registered_in_its_process():
    landing, _ = _landing(CPU_CASE, "torch", 2, None)
    try:
        landing.start(register_as="/run/test-tier.sock")
        assert landing.address is not None and landing.address.startswith("127.0.0.1:")
        assert landing_for("/run/test-tier.sock") is landing
        _land(landing, b"a", torch.zeros(landing.staged.chunk_nbytes, dtype=torch.uint8))
        assert landed_in_process("/run/test-tier.sock", [b"a", b"b"]) == [True, False]
        assert landed_in_process("/run/other.sock", [b"a"]) == [False]
    finally:
        landing.close()
    assert landing_for("/run/test-tier.sock") is None


@pytest.mark.parametrize(
    ("case", "impl"),
    [
        pytest.param(CPU_CASE, "torch", id="cpu_attn-torch"),
        pytest.param(
            FA_CASE,
            "triton",
            id="flash_attn-triton",
            marks=pytest.mark.skipif(not triton_impl.HAVE_TRITON, reason=NO_TRITON),
        ),
    ],
)
def test_nixl_dram_push_from_another_process_lands_and_loads_into_paged_caches(case, impl):
    """A prefill process packs into its staging region and pushes over NIXL (DRAM -> DRAM here) into this
    process's landing; the worker half loads the chunks from the landing into paged caches, bit for bit."""
    layout = case[0]
    tier = MemTier()
    landing, dst = _landing(case, impl, 8, tier)
    before = [t.clone() for t in dst]
    keys, src_ids, dst_ids = [b"c0", b"c1", b"c2"], [[3, 7], [1, 0], [8, 4]], [[0, 8], [5, 2], [6, 1]]
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = None
    try:
        host, port = landing.start().rsplit(":", 1)
        args = (child, FP, layout, case[1], case[2], 1, "torch", "cpu", (host, int(port)), keys, src_ids)
        proc = ctx.Process(target=dp.run_prefill, args=args)
        proc.start()
        assert conn.poll(120), "prefill side did not report"
        assert conn.recv()[:2] == ("ok", 3)
        assert landing.landed(keys) == [True] * 3 and landing.stats.landed == 3
        w = ConnectorWorker(MemTier(), landing.staged.packer, BPC, landing=landing)
        w.load(PdmeshConnectorMetadata(loads=[ChunkOp("r", keys, dst_ids)]))
        assert (w.stats.device_loads, w.stats.load_errors) == (3, 0)
        src = dp.make_caches(*case, 1, "cpu")
        _check_moved(src, dst, before, layout, _moves(src_ids, dst_ids))
        assert _until(lambda: landing.staging.stats().free == 8)
        assert tier.ready == set(keys)  # copied into the host tier too
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        landing.close()
        if proc is not None and proc.is_alive():
            proc.kill()
        if proc is not None:
            proc.join(10)


@pytest.fixture
def decode_tier():
    """The decode node's tier receiver (host pool, NIXL) in another process."""
    with dp.pool_receiver(FP) as tier:
        yield tier


KEYS = [b"k" * 16, b"j" * 16, b"i" * 16]
BLOCKS = [[3, 7], [1, 0], [8, 4]]


def _device_save(landing_slots: int | None, decode_tier, dead_landing: bool = False):
    """A prefill worker half with the device path saves KEYS with a push naming a device landing (``landing_slots``
    slots, in this process; None: no landing named) and the decode tier; returns (push stats, worker stats,
    landing or None, what the decode tier got)."""
    peer, conn = decode_tier
    src = dp.make_caches(*CPU_CASE, 1, "cpu")
    packer = dp.ForcedImpl(bind(src, get_layout(CPU_CASE[0])), "torch")
    landing = None
    device_peer = "127.0.0.1:9" if dead_landing else None
    if landing_slots is not None:
        landing, _ = _landing(CPU_CASE, "torch", landing_slots, None)
        device_peer = landing.start()
    push = DevicePush.build(packer, BPC, 4, FP, "")
    try:
        w = ConnectorWorker(MemTier(), packer, BPC, device_push=push)
        spec = PushSpec("t.1", peer, 20.0, device_peer)
        w.save(PdmeshConnectorMetadata(saves=[ChunkOp("r", KEYS, BLOCKS, spec)]))
        assert push.drain(60)
        conn.send(("get", KEYS))
        assert conn.poll(60)
        got = conn.recv()
        want = {
            k: reference_pack(src, get_layout(CPU_CASE[0]), ids).numpy().tobytes()
            for k, ids in zip(KEYS, BLOCKS, strict=True)
        }
        landed = None
        if landing is not None:
            landed = {k: landing.staging.view(k).numpy().tobytes() for k in KEYS if landing.has(k)}
        assert push.staged.staging.stats().free == 4  # the prefill's slots are back
        return push.stats, w.stats, landed, got, want
    finally:
        push.close()
        if landing is not None:
            landing.close()


def test_device_push_lands_in_the_decode_workers_landing_when_it_has_room(decode_tier):
    stats, wstats, landed, got, want = _device_save(4, decode_tier)
    assert (stats.pushes, stats.to_device, stats.fallbacks, stats.failures) == (1, 1, 0, 0)
    assert wstats.device_pushes == 1
    assert landed == want and got == {}  # into device memory, not the decode tier's host pool


def test_full_landing_sends_the_push_to_the_decode_tier_instead(decode_tier):
    stats, _, landed, got, want = _device_save(2, decode_tier)  # 2 slots for 3 chunks: ALLOC refused
    assert (stats.pushes, stats.to_device, stats.fallbacks, stats.failures) == (1, 0, 1, 0)
    assert landed == {} and got == want


def test_absent_landing_sends_the_push_to_the_decode_tier_instead(decode_tier):
    stats, _, _, got, want = _device_save(None, decode_tier, dead_landing=True)
    assert (stats.pushes, stats.fallbacks, stats.failures) == (1, 1, 0) and got == want


def test_no_landing_named_pushes_to_the_decode_tier(decode_tier):
    stats, _, _, got, want = _device_save(None, decode_tier)
    assert (stats.pushes, stats.to_device, stats.fallbacks) == (1, 0, 0) and got == want


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_impl.HAVE_TRITON), reason=NO_CUDA)
def test_landing_in_device_memory_unpacks_with_compiled_triton_and_copies_to_the_host_tier():
    """On a GPU: the landing's region is VRAM (what NIXL registers), the host copy runs on a side stream, the
    unpack is the compiled Triton kernel; the bytes match the source."""
    src = dp.make_caches(*FA_CASE, 1, "cuda")
    tier = MemTier()
    landing, dst = _landing(FA_CASE, "triton", 2, tier, device="cuda")
    assert landing.staging.memory_region.mem_type == "VRAM"
    landing._thread.start()
    try:
        lay = get_layout(FA_CASE[0])
        _land(landing, b"k", reference_pack([t.cpu() for t in src], lay, [3, 7]).view(-1).cuda())
        assert _until(lambda: landing.stats.host_copies == 1)
        w = ConnectorWorker(MemTier(), landing.staged.packer, BPC, landing=landing)
        w.load(PdmeshConnectorMetadata(loads=[ChunkOp("r", [b"k"], [[0, 8]])]))
        assert w.stats.device_loads == 1
        for s_t, d_t in zip(src, dst, strict=True):
            assert same_bytes(block_bytes(d_t.cpu(), lay, 0), block_bytes(s_t.cpu(), lay, 3))
            assert same_bytes(block_bytes(d_t.cpu(), lay, 8), block_bytes(s_t.cpu(), lay, 7))
        off, n = tier.where[b"k"]
        assert (
            bytes(tier.buf[off : off + n])
            == reference_pack([t.cpu() for t in src], lay, [3, 7]).numpy().tobytes()
        )
        assert landing.staging.stats().free == 2
    finally:
        landing.close()


def test_a_push_that_fails_at_once_keeps_the_slots_until_the_saver_releases_them():
    """The push and the save's host copy both read a staged slot: a push to a dead peer ends in milliseconds, and
    must not free a slot the save is still copying from (it is freed when both let go)."""
    src = dp.make_caches(*CPU_CASE, 1, "cpu")
    packer = dp.ForcedImpl(bind(src, get_layout(CPU_CASE[0])), "torch")
    push = DevicePush.build(packer, BPC, 4, FP, "")
    try:
        chunks = push.stage(KEYS, BLOCKS)
        assert chunks is not None and push.submit("127.0.0.1:9", "t.1", 5.0, chunks)
        assert push.drain(30) and push.stats.failures == 1
        assert push.staged.staging.stats().free == 1  # the push ended; the saver still holds three slots
        out = torch.empty(push.staged.chunk_nbytes, dtype=torch.uint8)
        push.copy_to_host(KEYS[0], out).wait()
        assert same_bytes(out, reference_pack(src, get_layout(CPU_CASE[0]), BLOCKS[0]))
        push.release(chunks)
        assert push.staged.staging.stats().free == 4
    finally:
        push.close()
