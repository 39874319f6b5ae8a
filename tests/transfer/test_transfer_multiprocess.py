"""Multi-process tests on 127.0.0.1, for each backend: bytes identical, peer death, fingerprint refusal."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from pdmesh.transfer.errors import CODES, PD_INCOMPATIBLE_PEER, TransferError
from pdmesh.transfer.receiver import Receiver, ReceiverConfig
from pdmesh.transfer.reference_pool import ReferencePool
from pdmesh.transfer.sender import Chunk, Sender, SenderConfig
from tests.transfer import _procs
from tests.transfer.conftest import BACKENDS

FP = "model=tiny;dtype=fp32;layout=cpu;bs=32;tp=0/1;fmt=1"
KiB = 1 << 10


@pytest.fixture
def receiver(request):
    backend = request.param
    pool = ReferencePool(256 * KiB, 128)
    rx = Receiver(
        pool,
        ReceiverConfig(fingerprint=FP, grace_s=0.3, reap_interval_s=0.05),
        [_procs.make_backend(backend, FP)],
    )
    rx.start()
    yield backend, pool, rx
    rx.close()
    pool.close()


def _recv(conn, timeout=60.0):
    assert conn.poll(timeout), "child did not answer in time"
    return conn.recv()


def _check_bytes(pool: ReferencePool, seed: int, transfers: int, per: int, chunk: int) -> None:
    expected = _procs.pattern(seed, transfers * per * chunk)
    for t in range(transfers):
        for i in range(per):
            view = pool.get(f"t{t}-{i}".encode())
            assert view is not None, (t, i)
            off = (t * per + i) * chunk
            assert np.array_equal(np.frombuffer(view, dtype=np.uint8), expected[off : off + chunk]), (t, i)
            view.release()


def _wait_until(pred, timeout=15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.mark.parametrize("receiver", BACKENDS, indirect=True)
def test_one_chunk_then_many_concurrent_transfers_arrive_identical(receiver, spawn):
    backend, pool, rx = receiver
    _, conn = spawn(_procs.run_sender, backend, FP, rx.address, 1, 1, 1, 256 * KiB, 1)
    assert _recv(conn) == [("ok", backend, 1, 0)]
    _check_bytes(pool, 1, 1, 1, 256 * KiB)
    assert pool.consume(b"t0-0")

    _, conn = spawn(_procs.run_sender, backend, FP, rx.address, 2, 24, 4, 256 * KiB, 8)
    results = _recv(conn)
    assert sorted(results) == [("ok", backend, 4, 0)] * 24
    _check_bytes(pool, 2, 24, 4, 256 * KiB)
    st = rx.stats()
    assert st.leases == 0 and st.committed == 25
    assert pool.stats().ready == 96 and pool.stats().leased == 0


@pytest.mark.parametrize("receiver", BACKENDS, indirect=True)
def test_sender_killed_mid_transfer_receiver_reclaims_leases(receiver, spawn):
    backend, pool, rx = receiver
    baseline = pool.stats()
    proc, _ = spawn(_procs.run_sender, backend, FP, rx.address, 3, 1, 4, 256 * KiB, 1, True)
    proc.join(30)
    assert proc.exitcode == -9
    assert _wait_until(lambda: pool.stats() == baseline and rx.stats().leases == 0)
    assert rx.stats().reaped == 1 and rx.stats().committed == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_killed_mid_transfer_sender_gets_typed_error(backend, spawn):
    kill_on = "write" if backend == "tcp" else "commit"
    proc, conn = spawn(_procs.run_receiver, backend, FP, kill_on)
    address = tuple(_recv(conn))
    src = memoryview(bytearray(os.urandom(4 << 20)))
    sender = Sender(
        src,
        SenderConfig(fingerprint=FP, backends=(backend,)),
        {backend: lambda: _procs.make_backend(backend, FP)},
    )
    try:
        deadline_s = 8.0
        t0 = time.monotonic()
        with pytest.raises(TransferError) as info:
            sender.push(address, "doomed", [Chunk(b"k0", 0, 4 << 20)], t0 + deadline_s)
        elapsed = time.monotonic() - t0
        assert info.value.code in CODES and info.value.code != PD_INCOMPATIBLE_PEER
        assert info.value.retryable
        assert elapsed < deadline_s + 2.0  # by its deadline (+ one bounded ABORT attempt)
        proc.join(10)
        assert proc.exitcode == -9
    finally:
        sender.close()


@pytest.mark.parametrize("receiver", BACKENDS, indirect=True)
def test_peer_with_other_fingerprint_is_refused_at_handshake(receiver, spawn):
    backend, pool, rx = receiver
    _, conn = spawn(_procs.run_sender, backend, "another-model-fingerprint", rx.address, 4, 1, 1, 64 * KiB, 1)
    [result] = _recv(conn)
    assert result[:3] == ("error", PD_INCOMPATIBLE_PEER, False)
    assert rx.stats().leases == 0 and pool.stats().leased == 0
