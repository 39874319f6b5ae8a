"""The device path (connector/device_path.py): the config rule, pack into / unpack from staging regions with the
real kernels (torch and the Triton interpreter), and a push between two processes over NIXL from one staging
region into another, unpacked into paged caches bit for bit. On CPU the regions are host memory registered as
NIXL DRAM; the same tests on device memory (NIXL VRAM, compiled Triton) run only where CUDA is present."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

os.environ.setdefault("UCX_NET_DEVICES", "lo")

from pdmesh.connector.config import ConnectorConfig
from pdmesh.connector.device_path import DevicePathConfig, device_path_decision
from pdmesh.kernels import get_layout, triton_impl
from pdmesh.transfer.errors import PoolExhausted
from pdmesh.transfer.nixl_backend import nixl_available
from tests.connector import _device_procs as dp
from tests.kernels.kvhelpers import block_bytes, reference_pack, same_bytes

FP = "model=tiny;dtype=any;layout=test;bs=4;tp=0/1;fmt=1"
HAVE_CUDA = torch.cuda.is_available()
NO_CUDA = (
    "needs a CUDA GPU (none on this machine): device staging, compiled Triton, NIXL VRAM over UCX cuda_ipc"
)
NO_TRITON = "triton is not installed"
# (layout, per-layer shape with 9 blocks, dtype)
CPU_CASE = ("cpu_attn", (9, 2, 32, 16), "float32")
FA_CASE = ("flash_attn_nhd", (2, 9, 4, 2, 8), "bfloat16")


def _device_config(extra: dict) -> DevicePathConfig:
    """The device path's part of a kv_connector_extra_config, parsed the one way the connector does."""
    return DevicePathConfig.from_config(ConnectorConfig.load(extra, block_size=1, env={}))


def test_config_flag_parses_and_defaults_off():
    assert _device_config({}) == DevicePathConfig(False, 64)
    assert _device_config({"device_staging": "true", "device_staging_slots": 8}) == DevicePathConfig(True, 8)
    assert not _device_config({"device_staging": "off"}).enabled
    with pytest.raises(ValueError):
        _device_config({"device_staging": True, "device_staging_slots": 0})


def test_device_path_is_on_only_for_cuda_caches_with_nixl():
    on = DevicePathConfig(True, 4)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert device_path_decision(DevicePathConfig(), cuda, True)[0] is False
    use, why = device_path_decision(on, cpu, True)
    assert not use and "cpu" in why
    use, why = device_path_decision(on, cuda, False)
    assert not use and "NIXL" in why
    assert device_path_decision(on, cuda, True)[0] is True


def test_device_path_asks_the_registry_whether_nixl_can_start(monkeypatch):
    import pdmesh.transfer.nixl_backend as nb

    on, cuda = DevicePathConfig(True, 4), torch.device("cuda", 0)
    monkeypatch.setattr(nb, "nixl_available", lambda: False)
    use, why = device_path_decision(on, cuda)
    assert not use and "NIXL" in why
    monkeypatch.setattr(nb, "nixl_available", lambda: True)
    assert device_path_decision(on, cuda)[0] is True


def test_staging_sender_and_receiver_build_nixl_through_the_registry_on_one_lane(monkeypatch):
    """Both ends build NIXL by name (pdmesh.transfer.registry) with the caller's config, one lane unless it sets
    lanes; agents are stand-ins here, so this runs without NIXL."""
    from pdmesh.connector.device_path import staging_receiver, staging_sender
    from pdmesh.transfer import nixl_backend, registry
    from pdmesh.transfer.device_staging import StagingRegion
    from pdmesh.transfer.nixl_backend import NixlBackend, NixlConfig
    from pdmesh.transfer.receiver import ReceiverConfig
    from pdmesh.transfer.sender import SenderConfig

    monkeypatch.setattr(nixl_backend, "make_agent", lambda name, config: object())
    monkeypatch.setattr(nixl_backend, "apply_ucx_env", lambda config: None)
    built = []
    real_build = registry.build

    def build(name, options):
        built.append((name, options))
        return real_build(name, options)

    monkeypatch.setattr(registry, "build", build)
    st = StagingRegion(4096, 2)
    rx = staging_receiver(st, ReceiverConfig(fingerprint=FP), NixlConfig(ucx_env={"UCX_TLS": "tcp"}))
    tx = staging_sender(st, SenderConfig(fingerprint=FP, backends=("nixl",)), NixlConfig(lanes=3))
    try:
        [(name, options)] = built
        assert name == "nixl" and options.fingerprint == FP
        assert options.nixl == NixlConfig(ucx_env={"UCX_TLS": "tcp"}, lanes=1)
        b = rx.backends["nixl"]
        assert isinstance(b, NixlBackend) and b.lanes == 1
        assert list(tx._factories) == ["nixl"]
        made = tx._factories["nixl"]()
        try:
            assert isinstance(made, NixlBackend) and made.config.lanes == 3 and made.lanes == 3
        finally:
            made.close()
    finally:
        tx.close()
        rx.close()
        st.close()


@pytest.mark.parametrize(
    ("pack_impl", "unpack_impl"),
    [
        ("torch", "torch"),
        pytest.param(
            "triton", "torch", marks=pytest.mark.skipif(not triton_impl.HAVE_TRITON, reason=NO_TRITON)
        ),
    ],
)
@pytest.mark.parametrize("case", [CPU_CASE, FA_CASE], ids=lambda c: c[0])
def test_pack_into_staging_then_unpack_from_staging_is_bit_exact(case, pack_impl, unpack_impl):
    layout = case[0]
    src, dst = dp.make_caches(*case, 1, "cpu"), dp.make_caches(*case, 2, "cpu")
    before = [t.clone() for t in dst]
    a = dp.staged(layout, src, pack_impl, 2, "cpu")
    b = dp.staged(layout, dst, unpack_impl, 2, "cpu")
    chunks = {b"k1": ([3, 7], [0, 8]), b"k2": ([1, 0], [5, 2])}  # src blocks -> dst blocks
    for key, (ids, _) in chunks.items():
        off = a.pack(key, ids)
        assert off is not None and a.pack(key, ids) is None  # staged once
        host = torch.empty(a.chunk_nbytes, dtype=torch.uint8)
        a.copy_to_host(key, host).wait()
        assert same_bytes(host, reference_pack(src, get_layout(layout), ids))
        # what the one-sided write does: the bytes land in a leased slot, then COMMIT
        b.staging.alloc(key, a.chunk_nbytes, float("inf"))
        b.staging.view(key).copy_(a.staging.view(key))
        b.staging.commit(key)
        a.discard(key)
    assert b.unpack(b"missing", [4, 6]) is False
    for key, (_, dst_ids) in chunks.items():
        assert b.unpack(key, dst_ids)
    lay = get_layout(layout)
    moved = {d: s for ids, dst_ids in chunks.values() for s, d in zip(ids, dst_ids, strict=True)}
    for s_t, d_t, b_t in zip(src, dst, before, strict=True):
        for blk in range(9):
            want = block_bytes(s_t, lay, moved[blk]) if blk in moved else block_bytes(b_t, lay, blk)
            assert same_bytes(block_bytes(d_t, lay, blk), want), blk
    assert a.staging.stats().free == 2 and b.staging.stats().free == 2


def test_failed_pack_frees_its_slot_and_a_full_region_refuses():
    src = dp.make_caches(*CPU_CASE, 1, "cpu")
    st = dp.staged(CPU_CASE[0], src, "torch", 1, "cpu")
    with pytest.raises(IndexError):
        st.pack(b"bad", [0, 99])  # block id out of range: validated before any copy
    assert st.staging.stats().free == 1
    st.pack(b"a", [0, 1])
    with pytest.raises(PoolExhausted):
        st.pack(b"b", [2, 3])
    st.discard(b"a")
    assert st.staging.stats().free == 1


def _push_and_unpack(case, pack_impl, unpack_impl, device):
    layout, shape, dtype = case
    ctx = mp.get_context("spawn")
    procs = []
    try:
        dec_conn, child = ctx.Pipe()
        dec = ctx.Process(
            target=dp.run_decode, args=(child, FP, layout, shape, dtype, 2, unpack_impl, device)
        )
        dec.start()
        procs.append(dec)
        assert dec_conn.poll(120), "decode side did not start"
        address = dec_conn.recv()
        keys, src_ids, dst_ids = [b"c0", b"c1", b"c2"], [[3, 7], [1, 0], [8, 4]], [[0, 8], [5, 2], [6, 1]]
        pre_conn, child = ctx.Pipe()
        args = (child, FP, layout, shape, dtype, 1, pack_impl, device, address, keys, src_ids)
        pre = ctx.Process(target=dp.run_prefill, args=args)
        pre.start()
        procs.append(pre)
        assert pre_conn.poll(120), "prefill side did not report"
        tag, written, host_copies = pre_conn.recv()
        assert (tag, written) == ("ok", 3)
        dec_conn.send(("unpack", keys, dst_ids))
        assert dec_conn.poll(120), "decode side did not unpack"
        tag, unpacked, dst_wire, free = dec_conn.recv()
        dec_conn.send("bye")
        assert tag == "done" and unpacked == keys and free == 8
        src = dp.make_caches(*case, 1, "cpu")
        before = dp.make_caches(*case, 2, "cpu")
        dst = dp.from_wire(before, dst_wire)
        lay = get_layout(layout)
        for k, ids in enumerate(src_ids):  # the host tier's copies are the chunks too
            assert host_copies[k] == reference_pack(src, lay, ids).numpy().tobytes()
        moved = {
            d: s
            for s_ids, d_ids in zip(src_ids, dst_ids, strict=True)
            for s, d in zip(s_ids, d_ids, strict=True)
        }
        for s_t, d_t, b_t in zip(src, dst, before, strict=True):
            for blk in range(9):
                want = block_bytes(s_t, lay, moved[blk]) if blk in moved else block_bytes(b_t, lay, blk)
                assert same_bytes(block_bytes(d_t, lay, blk), want), blk
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)


@pytest.mark.skipif(not nixl_available(), reason="nixl (nixl-cu12) not installed")
@pytest.mark.parametrize(
    ("case", "pack_impl", "unpack_impl"),
    [
        pytest.param(CPU_CASE, "torch", "torch", id="cpu_attn-torch"),
        pytest.param(
            FA_CASE,
            "torch",
            "triton",
            id="flash_attn-triton",
            marks=pytest.mark.skipif(not triton_impl.HAVE_TRITON, reason=NO_TRITON),
        ),
    ],
)
def test_nixl_dram_push_between_processes_unpacks_into_paged_caches(case, pack_impl, unpack_impl):
    _push_and_unpack(case, pack_impl, unpack_impl, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_CUDA and nixl_available() and triton_impl.HAVE_TRITON), reason=NO_CUDA)
def test_nixl_vram_push_between_processes_unpacks_into_device_caches():
    _push_and_unpack(FA_CASE, "triton", "triton", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason=NO_CUDA)
def test_device_staging_round_trip_and_host_copy_on_cuda():
    src, dst = dp.make_caches(*FA_CASE, 1, "cuda"), dp.make_caches(*FA_CASE, 2, "cuda")
    a = dp.staged(FA_CASE[0], src, "triton", 1, "cuda")
    b = dp.staged(FA_CASE[0], dst, "triton", 1, "cuda")
    assert a.staging.memory_region.mem_type == "VRAM" and a.staging.buffer is None
    a.pack(b"k", [3, 7])
    host = torch.empty(a.chunk_nbytes, dtype=torch.uint8, pin_memory=True)
    a.copy_to_host(b"k", host).wait()
    assert same_bytes(host, reference_pack([t.cpu() for t in src], get_layout(FA_CASE[0]), [3, 7]))
    b.staging.alloc(b"k", a.chunk_nbytes, float("inf"))
    b.staging.view(b"k").copy_(a.staging.view(b"k"))
    b.staging.commit(b"k")
    assert b.unpack(b"k", [0, 8])
    lay = get_layout(FA_CASE[0])
    for s_t, d_t in zip(src, dst, strict=True):
        assert same_bytes(block_bytes(d_t.cpu(), lay, 0), block_bytes(s_t.cpu(), lay, 3))
        assert same_bytes(block_bytes(d_t.cpu(), lay, 8), block_bytes(s_t.cpu(), lay, 7))
