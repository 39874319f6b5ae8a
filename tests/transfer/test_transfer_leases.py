"""In-process tests of the lease rules and the control protocol (no timing assertions)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from pdmesh.transfer.errors import (
    PD_INCOMPATIBLE_PEER,
    PD_TRANSFER_FAILED,
    IncompatiblePeer,
    TransferFailed,
)
from pdmesh.transfer.protocol import PROTOCOL_VERSION, connect, request
from pdmesh.transfer.receiver import Receiver, ReceiverConfig
from pdmesh.transfer.reference_pool import ReferencePool
from pdmesh.transfer.sender import Chunk, Sender, SenderConfig
from pdmesh.transfer.tcp_backend import TcpBackend

FP = "fp-test"


@pytest.fixture
def rx():
    pool = ReferencePool(4096, 8)
    # reap_interval long: the tests drive reap() themselves with chosen clocks
    r = Receiver(
        pool,
        ReceiverConfig(fingerprint=FP, token="s3cret", grace_s=5.0, reap_interval_s=3600),
        [TcpBackend(FP, "s3cret")],
    )
    r.start()
    yield r, pool
    r.close()
    pool.close()


def _control(r: Receiver, token="s3cret", fingerprint=FP) -> socket.socket:
    deadline = time.monotonic() + 5
    s = connect(r.address, deadline)
    hello = {
        "op": "hello",
        "v": PROTOCOL_VERSION,
        "token": token,
        "fingerprint": fingerprint,
        "backends": ["tcp"],
    }
    request(s, hello, "hello_ok", deadline)
    return s


def _req(s, msg, expect):
    return request(s, msg, expect, time.monotonic() + 5)


def test_abort_frees_region_only_after_grace(rx):
    r, pool = rx
    s = _control(r)
    reply = _req(
        s,
        {"op": "alloc", "transfer_id": "a", "keys": [b"k1", b"k2"], "sizes": [10, 20], "lease_ms": 10_000},
        "alloc_ok",
    )
    assert len(reply["offsets"]) == 2 and None not in reply["offsets"]
    _req(s, {"op": "abort", "transfer_id": "a"}, "abort_ok")
    _req(s, {"op": "abort", "transfer_id": "a"}, "abort_ok")  # idempotent
    now = time.monotonic()
    assert r.reap(now) == 0 and pool.stats().leased == 2  # inside the grace: still reserved
    assert r.begin_write(b"a", [(reply["offsets"][0], 10)]) is None  # and no new write admitted
    with pytest.raises(TransferFailed):
        _req(s, {"op": "commit", "transfer_id": "a"}, "commit_ok")
    assert r.reap(now + 5.1) == 2
    assert pool.stats().free == 8 and r.stats().leases == 0
    s.close()


def test_commit_is_idempotent_and_present_keys_are_skipped(rx):
    r, _ = rx
    s = _control(r)
    _req(
        s, {"op": "alloc", "transfer_id": "c", "keys": [b"x"], "sizes": [100], "lease_ms": 10_000}, "alloc_ok"
    )
    assert _req(s, {"op": "commit", "transfer_id": "c"}, "commit_ok")["committed"] == 1
    assert _req(s, {"op": "commit", "transfer_id": "c"}, "commit_ok")["committed"] == 1
    reply = _req(
        s,
        {"op": "alloc", "transfer_id": "d", "keys": [b"x", b"y"], "sizes": [100, 100], "lease_ms": 10_000},
        "alloc_ok",
    )
    assert reply["offsets"][0] is None and reply["offsets"][1] is not None
    s.close()


def test_expired_lease_refuses_late_write_and_commit(rx):
    r, pool = rx
    s = _control(r)
    reply = _req(
        s, {"op": "alloc", "transfer_id": "e", "keys": [b"z"], "sizes": [64], "lease_ms": 0}, "alloc_ok"
    )
    off = reply["offsets"][0]
    assert r.begin_write(b"e", [(off, 64)]) is None
    with pytest.raises(TransferFailed) as info:
        _req(s, {"op": "commit", "transfer_id": "e"}, "commit_ok")
    assert info.value.retryable
    assert r.reap(time.monotonic() + 5.1) == 1 and pool.stats().free == 8
    s.close()


def test_write_outside_the_lease_is_refused(rx):
    r, _ = rx
    s = _control(r)
    reply = _req(
        s, {"op": "alloc", "transfer_id": "w", "keys": [b"q"], "sizes": [64], "lease_ms": 10_000}, "alloc_ok"
    )
    off = reply["offsets"][0]
    assert r.begin_write(b"w", [(off + 4096, 64)]) is None
    assert r.begin_write(b"w", [(off, 65)]) is None
    d = r.begin_write(b"w", [(off, 64)])
    assert d is not None
    r.end_write(b"w", True)
    s.close()


def test_pool_exhausted_is_typed_and_leaks_nothing(rx):
    r, pool = rx
    s = _control(r)
    keys = [f"k{i}".encode() for i in range(9)]
    with pytest.raises(TransferFailed) as info:  # PoolExhausted on the receiver, typed by code on the wire
        _req(
            s,
            {"op": "alloc", "transfer_id": "p", "keys": keys, "sizes": [1] * 9, "lease_ms": 10_000},
            "alloc_ok",
        )
    assert info.value.code == PD_TRANSFER_FAILED and info.value.retryable
    assert pool.stats().free == 8 and r.stats().leases == 0
    s.close()


def test_bad_token_and_fingerprint_refused(rx):
    r, _ = rx
    for kwargs in ({"token": "wrong"}, {"fingerprint": "other"}):
        with pytest.raises(IncompatiblePeer) as info:
            _control(r, **kwargs)
        assert info.value.code == PD_INCOMPATIBLE_PEER and not info.value.retryable


def test_push_round_trip_over_tcp_in_process(rx):
    r, pool = rx
    src = memoryview(bytearray(os.urandom(8192)))
    sender = Sender(
        src,
        SenderConfig(fingerprint=FP, token="s3cret", backends=("tcp",)),
        {"tcp": lambda: TcpBackend(FP, "s3cret")},
    )
    try:
        res = sender.push(
            r.address, "rt", [Chunk(b"a", 0, 4096), Chunk(b"b", 4096, 4096)], time.monotonic() + 10
        )
        assert res.written == [b"a", b"b"] and res.nbytes == 8192
        assert bytes(pool.get(b"a")) == bytes(src[:4096]) and bytes(pool.get(b"b")) == bytes(src[4096:])
        res = sender.push(
            r.address, "rt2", [Chunk(b"a", 0, 4096)], time.monotonic() + 10
        )  # pooled connection
        assert res.skipped == [b"a"] and res.nbytes == 0
    finally:
        sender.close()


def test_receiver_bound_to_wildcard_advertises_the_reachable_host():
    """Containers bind 0.0.0.0: the data listener must tell senders an address they can dial, not 0.0.0.0."""
    pool = ReferencePool(4096, 4)
    backend = TcpBackend(FP, "s3cret", host="0.0.0.0", advertise_host="127.0.0.1")
    r = Receiver(
        pool,
        ReceiverConfig(fingerprint=FP, token="s3cret", host="0.0.0.0", reap_interval_s=3600),
        [backend],
    )
    r.start()
    src = memoryview(bytearray(os.urandom(4096)))
    sender = Sender(
        src,
        SenderConfig(fingerprint=FP, token="s3cret", backends=("tcp",)),
        {"tcp": lambda: TcpBackend(FP, "s3cret")},
    )
    try:
        res = sender.push(("127.0.0.1", r.address[1]), "wild", [Chunk(b"w", 0, 4096)], time.monotonic() + 10)
        assert res.written == [b"w"]
        assert bytes(pool.get(b"w")) == bytes(src)
    finally:
        sender.close()
        r.close()
        pool.close()
