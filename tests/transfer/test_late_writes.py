"""A sender that stalls past its lease (+ grace) never writes into a region that was reused meanwhile
(:mod:`pdmesh.transfer.leases`).

- TCP: the receiver's own code takes every byte, so it admits writes only under a live lease, stops reading at
  the lease deadline and never frees a region while a write into it runs. A stalled writer's tail is refused.
- shm (and NIXL): one-sided, the bytes land without the receiver seeing them. An expired lease's region is
  kept until its writer shows it stopped (ABORT on its own connection, or the peer closing it), at most
  ``one_sided_hold_s``; the stalled writer's late copy lands in the held region, not in the chunk of the
  transfer that came next.

Real receivers, real backends, real sockets in one process; ``reap`` is driven with chosen clocks.
"""

from __future__ import annotations

import logging
import socket
import time

import pytest

from pdmesh.transfer.backend import Segment, unpack_metadata
from pdmesh.transfer.errors import PoolExhausted, TransferError, TransferFailed
from pdmesh.transfer.leases import sees_writes
from pdmesh.transfer.nixl_backend import NixlBackend
from pdmesh.transfer.peer_auth import client_handshake
from pdmesh.transfer.protocol import PROTOCOL_VERSION, connect, request, send_frame
from pdmesh.transfer.receiver import Receiver, ReceiverConfig
from pdmesh.transfer.reference_pool import ReferencePool
from pdmesh.transfer.shm_backend import ShmBackend
from pdmesh.transfer.tcp_backend import TcpBackend

FP = "fp-late-writes"
TOKEN = "s3cret"
SLOT = 4096
GRACE = 0.2


def _receiver(backend, **cfg) -> tuple[Receiver, ReferencePool]:
    pool = ReferencePool(SLOT, 2)  # slots are handed out lowest first, and a freed one is the next one reused
    config = ReceiverConfig(fingerprint=FP, token=TOKEN, grace_s=GRACE, reap_interval_s=3600, **cfg)
    r = Receiver(pool, config, [backend])
    r.start()
    return r, pool


def _control(r: Receiver, backend: str) -> tuple[socket.socket, dict]:
    deadline = time.monotonic() + 5
    s = connect(r.address, deadline)
    hello = {"op": "hello", "v": PROTOCOL_VERSION, "fingerprint": FP, "backends": [backend]}
    return s, client_handshake(s, hello, "hello_ok", TOKEN, deadline)


def _req(s: socket.socket, msg: dict, expect: str) -> dict:
    return request(s, msg, expect, time.monotonic() + 5)


def _alloc(s: socket.socket, tid: str, key: bytes, lease_ms: float) -> int:
    msg = {"op": "alloc", "transfer_id": tid, "keys": [key], "sizes": [SLOT], "lease_ms": lease_ms}
    [off] = _req(s, msg, "alloc_ok")["offsets"]
    return off


def _wait_until(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.01)
    return pred()


def test_which_backends_are_one_sided():
    assert sees_writes(TcpBackend(FP)) is True
    assert sees_writes(ShmBackend(FP)) is False
    assert sees_writes(object.__new__(NixlBackend)) is False  # not started: no agent needed for the question


def test_a_stalled_shm_writer_lands_in_its_held_region_not_in_the_next_chunk():
    r, pool = _receiver(ShmBackend(FP))
    src = memoryview(bytearray(b"\xee" * SLOT))
    writer = ShmBackend(FP)
    writer.register_memory(src)
    try:
        slow, hello = _control(r, "shm")
        peer = writer.connect(bytes(hello["metadata"]["shm"]))
        off = _alloc(slow, "slow", b"k-slow", 10)  # ... then the sender stalls before its copy
        time.sleep(0.01 + GRACE + 0.05)  # lease and grace over
        assert r.reap(time.monotonic()) == 0  # kept: its writer never showed it stopped
        assert r.stats().held == 1 and pool.stats().leased == 1

        nxt, _ = _control(r, "shm")  # the next transfer gets the other slot, not the held one
        off2 = _alloc(nxt, "next", b"k-next", 10_000)
        assert off2 != off
        with pytest.raises(TransferError):  # nothing else is free: the held region is not handed out
            _alloc(nxt, "more", b"k-more", 10_000)
        pool.buffer[off2 : off2 + SLOT] = b"\x42" * SLOT  # its bytes, however they got there
        _req(nxt, {"op": "commit", "transfer_id": "next"}, "commit_ok")

        # the stalled sender wakes up and copies (its deadline check passed before it stalled)
        writer.wait(writer.write(peer, [Segment(0, SLOT, off)], b"slow"), time.monotonic() + 5)
        view = pool.get(b"k-next")
        assert bytes(view) == b"\x42" * SLOT  # not corrupted
        view.release()
        assert (
            bytes(pool.buffer[off : off + SLOT]) == b"\xee" * SLOT
        )  # the late copy went where it was leased

        with pytest.raises(TransferFailed):  # its COMMIT is refused (expired) ...
            _req(slow, {"op": "commit", "transfer_id": "slow"}, "commit_ok")
        _req(slow, {"op": "abort", "transfer_id": "slow"}, "abort_ok")  # ... so it aborts: it has stopped
        now = time.monotonic()
        assert r.reap(now) == 0  # still the grace after it showed it stopped
        assert r.reap(now + 2 * GRACE) == 1
        assert pool.stats().leased == 0 and r.stats().held == 0 and r.stats().forced == 0
        writer.disconnect(peer)
        slow.close()
        nxt.close()
    finally:
        writer.close()
        r.close()
        pool.close()


def test_a_one_sided_lease_is_freed_when_its_peer_closes_not_when_the_receiver_times_it_out(caplog):
    """EOF from the sender (its process ended, or it gave up) shows the writer stopped; the receiver's own idle
    timeout, or an ABORT from another connection, does not: that lease waits for ``one_sided_hold_s``."""
    r, pool = _receiver(ShmBackend(FP), idle_timeout_s=0.3, one_sided_hold_s=30.0)
    try:
        gone, _ = _control(r, "shm")
        _alloc(gone, "gone", b"k1", 10)
        silent, _ = _control(r, "shm")
        _alloc(silent, "silent", b"k2", 10)
        other, _ = _control(r, "shm")
        _req(other, {"op": "abort", "transfer_id": "silent"}, "abort_ok")  # not the writer's own connection
        gone.close()
        assert _wait_until(
            lambda: r.stats().aborted == 1 and len(r._conns) == 0
        )  # idle timeout closed the rest
        later = time.monotonic() + 10 * GRACE
        assert r.reap(later) == 1  # "gone": its peer closed the connection
        assert r.stats().held == 1 and pool.stats().leased == 1  # "silent" is held
        with caplog.at_level(logging.WARNING, "pdmesh.transfer.receiver"):
            assert r.reap(later + 30.0) == 1  # the hold is over
        assert r.stats().forced == 1 and pool.stats().leased == 0
        assert any("could still write" in m for m in caplog.messages)
        other.close()
        silent.close()
    finally:
        r.close()
        pool.close()


def test_a_tcp_writer_stalled_past_its_lease_cannot_finish_into_the_reused_region():
    r, pool = _receiver(TcpBackend(FP, TOKEN))
    try:
        s, hello = _control(r, "tcp")
        md = unpack_metadata(bytes(hello["metadata"]["tcp"]), "tcp", FP)
        off = _alloc(s, "slow", b"k-slow", 1000)
        data = socket.create_connection((md["host"], md["port"]), timeout=5)
        data_hello = {"op": "data_hello", "fingerprint": FP}
        client_handshake(data, data_hello, "data_hello_ok", TOKEN, time.monotonic() + 5)
        send_frame(data, {"op": "write", "notif": b"slow", "segs": [[off, SLOT]]}, time.monotonic() + 5)
        data.sendall(b"\x11" * (SLOT // 2))  # half of it, then the sender stalls
        assert _wait_until(lambda: r._leases["slow"].writers == 1)
        assert r.reap(time.monotonic()) == 0  # a region is never freed while a write into it runs
        # the receiver stops reading at the lease deadline
        assert _wait_until(lambda: r._leases["slow"].writers == 0)
        assert r.stats().held == 0  # TCP: nothing waits for the writer, the receiver saw its write end
        time.sleep(GRACE + 0.05)
        assert r.reap(time.monotonic()) == 1

        off2 = _alloc(s, "next", b"k-next", 10_000)
        assert off2 == off  # the same region, reused
        sender = TcpBackend(FP, TOKEN)
        src = memoryview(bytearray(b"\x42" * SLOT))
        sender.register_memory(src)
        peer = sender.connect(bytes(hello["metadata"]["tcp"]))
        sender.wait(sender.write(peer, [Segment(0, SLOT, off2)], b"next"), time.monotonic() + 5)
        _req(s, {"op": "commit", "transfer_id": "next"}, "commit_ok")
        sender.close()

        try:  # the stalled sender wakes up and sends the rest: the receiver is not reading it any more
            data.sendall(b"\x11" * (SLOT // 2))
            time.sleep(0.2)
        except OSError:
            pass
        view = pool.get(b"k-next")
        assert bytes(view) == b"\x42" * SLOT
        view.release()
        data.close()
        s.close()
    finally:
        r.close()
        pool.close()


def test_a_full_pool_reports_exhaustion_while_a_region_is_held():
    """Held regions count as used: a new ALLOC meets PoolExhausted (typed, retryable), not a reused region."""
    r, pool = _receiver(ShmBackend(FP))
    try:
        s, _ = _control(r, "shm")
        _alloc(s, "a", b"a", 10)
        _alloc(s, "b", b"b", 10)
        time.sleep(0.02)
        assert r.reap(time.monotonic() + 10 * GRACE) == 0
        t, _ = _control(r, "shm")
        with pytest.raises(TransferError) as info:
            _alloc(t, "c", b"c", 10_000)
        assert info.value.code == PoolExhausted.code
        s.close()
        t.close()
    finally:
        r.close()
        pool.close()
