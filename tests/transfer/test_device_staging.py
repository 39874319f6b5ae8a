"""Staging regions (transfer/device_staging.py): slot lifecycle, what registers where, and pushes between two
processes from one staging region into another (NIXL DRAM and TCP here; NIXL VRAM where CUDA is present)."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from pdmesh.transfer.backend import MemoryRegion, TransferBackend, register_into
from pdmesh.transfer.device_staging import StagingRegion
from pdmesh.transfer.errors import PoolExhausted
from pdmesh.transfer.nixl_backend import nixl_available
from pdmesh.transfer.receiver import Receiver, ReceiverConfig
from pdmesh.transfer.shm_backend import ShmBackend
from pdmesh.transfer.tcp_backend import TcpBackend
from tests.transfer import _staging_procs as sp

FP = "model=tiny;dtype=fp32;layout=cpu;bs=32;tp=0/1;fmt=1"
NO_NIXL = "nixl (nixl-cu12) not installed"
NO_CUDA = "needs a CUDA GPU and NIXL built with UCX's CUDA transports (no GPU on this machine)"
HAVE_CUDA = torch.cuda.is_available()


def test_slot_lifecycle_and_every_slot_returns():
    st = StagingRegion(1024, 3)
    a = st.alloc(b"a", 1000, time.monotonic() + 60)
    b = st.alloc(b"b", 10, math.inf)
    assert {a, b} <= {0, 1024, 2048} and a != b
    assert st.alloc(b"a", 1000, math.inf) is None  # already has a slot: the sender skips it
    st.view(b"a").fill_(7)
    assert st.acquire(b"a") is None  # not committed yet
    st.commit(b"a")
    view = st.acquire(b"a")
    assert view is not None and view.numel() == 1000 and int(view.sum()) == 7000
    st.discard(b"a")  # being read: discard does not free it under the reader
    assert st.stats().reading == 1
    st.release(b"a")
    st.abort(b"b")
    assert st.stats().free == 3 and st.offset(b"a") is None


def test_full_region_and_oversized_chunk_are_refused_without_leaking():
    st = StagingRegion(64, 2)
    st.alloc(b"a", 64, math.inf)
    st.alloc(b"b", 64, math.inf)
    with pytest.raises(PoolExhausted):
        st.alloc(b"c", 64, math.inf)
    with pytest.raises(ValueError):
        st.alloc(b"d", 65, math.inf)
    st.abort(b"a")
    st.abort(b"b")
    assert st.stats().free == 2


def test_expired_leases_are_reclaimed_but_ready_slots_are_not():
    st = StagingRegion(64, 2)
    st.alloc(b"late", 8, deadline := time.monotonic() + 1.0)
    st.alloc(b"done", 8, deadline)
    st.commit(b"done")
    assert st.reclaim_expired(deadline - 0.5) == 0
    assert st.reclaim_expired(deadline + 0.1) == 1
    assert st.stats().free == 1 and st.stats().ready == 1


def test_wait_ready_is_bounded_and_wakes_on_commit():
    st = StagingRegion(64, 2)
    st.alloc(b"k", 8, math.inf)
    assert st.wait_ready([b"k"], time.monotonic() + 0.05) == []
    timer = threading.Timer(0.05, st.commit, args=(b"k",))
    timer.start()
    try:
        assert st.wait_ready([b"k"], time.monotonic() + 10) == [b"k"]
    finally:
        timer.cancel()


def test_host_region_is_registrable_memory_and_its_buffer_aliases_the_tensor():
    st = StagingRegion(4096, 2)
    r = st.memory_region
    assert (r.mem_type, r.device, r.size, r.address) == ("DRAM", 0, 8192, st.tensor.data_ptr())
    assert st.buffer is not None
    st.buffer[5] = 42
    assert int(st.tensor[5]) == 42


class _Recorder(TransferBackend):
    name = "rec"

    def __init__(self, mem_types: tuple[str, ...]) -> None:
        super().__init__(FP)
        self.region_mem_types = mem_types
        self.calls: list[tuple] = []

    def register_memory(self, buffer, segment_name=None):
        self.calls.append(("buffer", buffer.nbytes))

    def register_region(self, address, size, mem_type="DRAM", device=0):
        self.calls.append(("region", mem_type, device))

    def local_metadata(self):
        return b""

    def connect(self, peer_metadata):
        return "p"

    def write(self, peer, segments, notif):
        return None

    def wait(self, handle, deadline):
        return None

    def close(self):
        return None


def test_register_into_picks_region_buffer_or_nothing():
    vram = MemoryRegion(1 << 20, 4096, "VRAM", 1)
    dram = MemoryRegion(1 << 20, 4096, "DRAM", 0)
    buf = memoryview(bytearray(4096))
    both, host_only = _Recorder(("DRAM", "VRAM")), _Recorder(())
    assert register_into(both, None, None, vram) and both.calls == [("region", "VRAM", 1)]
    assert not register_into(host_only, None, None, vram) and host_only.calls == []
    assert not register_into(host_only, buf, None, vram)  # a buffer is never a stand-in for device memory
    assert register_into(host_only, buf, None, dram) and host_only.calls == [("buffer", 4096)]
    with pytest.raises(ValueError):
        MemoryRegion(1 << 20, 4096, "HBM")


def test_receiver_over_a_host_staging_region_offers_tcp_not_shm():
    """shm needs a named segment; a staging region has none, so shm is left out (the sender falls through)."""
    st = StagingRegion(4096, 2)
    rx = Receiver(st, ReceiverConfig(fingerprint=FP), [ShmBackend(FP), TcpBackend(FP)])
    try:
        rx.start()
        assert sorted(rx._hello_ok({"backends": ["shm", "tcp"]})["metadata"]) == ["tcp"]
    finally:
        rx.close()
        st.close()


CASES = [
    pytest.param(
        "nixl", "cpu", marks=pytest.mark.skipif(not nixl_available(), reason=NO_NIXL), id="nixl-DRAM"
    ),
    pytest.param("tcp", "cpu", id="tcp-DRAM"),
    pytest.param(
        "nixl",
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not (HAVE_CUDA and nixl_available()), reason=NO_CUDA)],
        id="nixl-VRAM",
    ),
]


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_push_from_one_staging_region_into_another_between_processes(spawn, backend, device):
    n, nbytes, seed = 5, 50_000, 3
    rx_proc, rx = spawn(sp.run_staging_receiver, backend, FP, device, 8)
    assert rx.poll(120), "receiver did not start"
    address = rx.recv()
    tx_proc, tx = spawn(sp.run_staging_sender, backend, FP, device, address, seed, n, nbytes)
    assert tx.poll(120), "sender did not report"
    assert tx.recv() == ("ok", backend, n)
    keys = [b"c%d" % i for i in range(n)]
    rx.send(("get", keys, 30.0))
    assert rx.poll(60)
    tag, got, stats = rx.recv()
    assert tag == "got" and sorted(got) == sorted(keys)
    for i, k in enumerate(keys):
        assert got[k] == sp.chunk_bytes(seed, i, nbytes).numpy().tobytes(), k
    assert stats.free == 8  # every slot read and released
    rx.send(("stop",))
    tx_proc.join(30)
    rx_proc.join(30)
    assert tx_proc.exitcode == 0 and rx_proc.exitcode == 0
