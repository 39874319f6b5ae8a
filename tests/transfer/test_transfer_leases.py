"""In-process tests of the lease rules and the control protocol (no timing assertions)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest

from pdmesh.transfer.errors import (
    PD_INCOMPATIBLE_PEER,
    PD_TRANSFER_FAILED,
    IncompatiblePeer,
    PeerUnavailable,
    TransferFailed,
)
from pdmesh.transfer.peer_auth import client_handshake
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
    hello = {"op": "hello", "v": PROTOCOL_VERSION, "fingerprint": fingerprint, "backends": ["tcp"]}
    client_handshake(s, hello, "hello_ok", token, deadline)
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


def test_peers_of_another_engine_are_refused_both_ways():
    """Nodes whose engines key chunks for another model, dtype or KV layout never exchange them: the receiver
    refuses a sender of another engine, the sender a receiver of another engine; a node that does not know its
    engine yet (no connector said hello) is not refused."""
    pool = ReferencePool(4096, 4)
    engine = {"rx": "nhd-engine"}
    r = Receiver(
        pool,
        ReceiverConfig(fingerprint=FP, engine=lambda: engine["rx"], token="s3cret"),
        [TcpBackend(FP, "s3cret")],
    )
    r.start()
    src = memoryview(bytearray(4096))

    def push(sender_engine: str, tid: str):
        sender = Sender(
            src,
            SenderConfig(fingerprint=FP, engine=lambda: sender_engine, token="s3cret", backends=("tcp",)),
            {"tcp": lambda: TcpBackend(FP, "s3cret")},
        )
        try:
            return sender.push(r.address, tid, [Chunk(tid.encode(), 0, 4096)], time.monotonic() + 10)
        finally:
            sender.close()

    try:
        with pytest.raises(IncompatiblePeer):
            push("hnd-engine", "t1")  # refused by the receiver before authentication
        assert pool.get(b"t1") is None
        assert push("nhd-engine", "t2").written == [b"t2"]
        assert push("", "t3").written == [b"t3"]  # a sender that does not know its engine yet
        engine["rx"] = ""
        assert push("hnd-engine", "t4").written == [b"t4"]  # nor a receiver
        engine["rx"] = "nhd-engine"
        with pytest.raises(IncompatiblePeer):  # the sender checks the receiver's answer too
            sender = Sender(
                src,
                SenderConfig(fingerprint=FP, engine=lambda: "hnd-engine", token="s3cret", backends=("tcp",)),
                {"tcp": lambda: TcpBackend(FP, "s3cret")},
            )
            try:
                r.config.engine = lambda: "nhd-engine"
                original = r._check_hello
                r._check_hello = lambda msg: None  # a receiver that skips its own check
                sender.push(r.address, "t5", [Chunk(b"t5", 0, 4096)], time.monotonic() + 10)
            finally:
                r._check_hello = original
                sender.close()
    finally:
        r.close()
        pool.close()


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


class FakeReceiver:
    """A hostile peer named by ``push_to``: accepts, records every frame, answers what it is told to."""

    def __init__(self, answer) -> None:
        self.frames: list[dict] = []
        self.raw = bytearray()
        self._answer = answer
        self._ls = socket.create_server(("127.0.0.1", 0))
        self.address = self._ls.getsockname()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        from pdmesh.transfer.protocol import recv_frame, send_frame

        try:
            conn, _ = self._ls.accept()
        except OSError:
            return
        with conn:
            try:
                while True:
                    msg = recv_frame(conn, time.monotonic() + 5)
                    self.frames.append(msg)
                    reply = self._answer(msg)
                    if reply is None:
                        return
                    send_frame(conn, reply, time.monotonic() + 5)
            except Exception:
                return

    def close(self) -> None:
        self._ls.close()
        self._t.join(5)


def _push_to(address, token="s3cret") -> None:
    pool = ReferencePool(4096, 2)
    try:
        tx = Sender(
            pool.buffer,
            SenderConfig(fingerprint=FP, token=token, backends=("shm", "tcp")),
            {
                "tcp": lambda: TcpBackend(FP, token),
            },
            segment_name=pool.segment_name,
        )
        with pytest.raises(IncompatiblePeer):
            tx.push(address, "t1", [Chunk(b"k" * 16, 0, 100)], time.monotonic() + 3)
        tx.close()
    finally:
        pool.close()


def test_a_fake_receiver_never_gets_the_token_nor_any_data():
    """The sender proves nothing and sends nothing until the peer proves the token (it cannot)."""
    from pdmesh.security import NONCE_BYTES

    fake = FakeReceiver(lambda m: {"op": "challenge", "nonce": os.urandom(NONCE_BYTES), "proof": b"x" * 32})
    try:
        _push_to(fake.address)
    finally:
        fake.close()
    assert [f["op"] for f in fake.frames] == ["hello"]  # no auth frame, no alloc
    hello = fake.frames[0]
    assert "token" not in hello and "host_id" not in hello
    assert b"s3cret" not in repr(fake.frames).encode()


def test_a_fake_receiver_echoing_hello_ok_is_refused():
    """A peer that skips the challenge (the old protocol's trust-what-answers) is refused."""
    fake = FakeReceiver(
        lambda m: {"op": "hello_ok", "v": PROTOCOL_VERSION, "fingerprint": FP, "metadata": {}}
    )
    try:
        _push_to(fake.address)
    finally:
        fake.close()
    assert len(fake.frames) == 1


def test_receiver_refuses_a_sender_without_the_token_before_any_alloc(rx):
    from pdmesh.security import NONCE_BYTES
    from pdmesh.transfer.protocol import recv_frame, send_frame

    r, _ = rx
    with pytest.raises(IncompatiblePeer):  # a real sender with the wrong token stops at the receiver's proof
        _control(r, token="wrong")
    s = connect(r.address, time.monotonic() + 5)  # a client that answers the challenge with a guess
    hello = {"op": "hello", "v": PROTOCOL_VERSION, "fingerprint": FP, "backends": ["tcp"]}
    send_frame(s, {**hello, "nonce": os.urandom(NONCE_BYTES)}, time.monotonic() + 5)
    assert recv_frame(s, time.monotonic() + 5)["op"] == "challenge"
    send_frame(s, {"op": "auth", "proof": os.urandom(32)}, time.monotonic() + 5)
    reply = recv_frame(s, time.monotonic() + 5)
    assert reply["op"] == "error" and reply["code"] == PD_INCOMPATIBLE_PEER
    s.settimeout(5)
    assert s.recv(1) == b""  # and the connection is closed: nothing more is served on it
    s.close()
    assert r.stats().leases == 0 and r.stats().refused >= 1


def test_receiver_bounds_pre_auth_frames_and_time(rx):
    from pdmesh.transfer.protocol import HELLO_TIMEOUT_S, PRE_AUTH_MAX_FRAME

    r, _ = rx
    s = socket.create_connection(r.address, timeout=HELLO_TIMEOUT_S + 5)
    s.sendall((PRE_AUTH_MAX_FRAME + 1).to_bytes(4, "big"))  # announce a frame larger than pre-auth allows
    t0 = time.monotonic()
    assert (
        s.recv(1 << 16) is not None
    )  # the receiver answers an error or closes, without waiting for the body
    assert time.monotonic() - t0 < 2
    s.close()
    trickle = socket.create_connection(r.address, timeout=HELLO_TIMEOUT_S + 5)  # one byte at a time
    trickle.sendall((100).to_bytes(4, "big"))
    t0 = time.monotonic()
    with contextlib.suppress(OSError):
        while time.monotonic() - t0 < HELLO_TIMEOUT_S + 5:
            trickle.sendall(b"x")  # each read is quick; the whole frame still has only HELLO_TIMEOUT_S
            time.sleep(0.5)
    assert time.monotonic() - t0 <= HELLO_TIMEOUT_S + 2
    trickle.close()
    idle = socket.create_connection(r.address, timeout=HELLO_TIMEOUT_S + 5)  # slowloris: says nothing
    t0 = time.monotonic()
    while idle.recv(1 << 16):
        pass
    assert time.monotonic() - t0 <= HELLO_TIMEOUT_S + 2  # closed at the hello deadline
    idle.close()


def test_receiver_caps_connections_and_keeps_serving(rx):
    r, _ = rx
    r.config.max_connections = 4
    held = [socket.create_connection(r.address, timeout=5) for _ in range(4)]
    time.sleep(0.3)
    extra = socket.create_connection(r.address, timeout=5)
    assert extra.recv(1) == b""  # closed at once: the cap holds without a thread for it
    extra.close()
    for s in held:
        s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # slots free up as the held connections close
        try:
            _control(r).close()
            break
        except (PeerUnavailable, IncompatiblePeer):
            time.sleep(0.1)
    else:
        raise AssertionError("receiver did not serve again after connections closed")
    assert r.stats().refused >= 1


def test_receiver_refuses_non_finite_lease(rx):
    r, _ = rx
    s = _control(r)
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(TransferFailed):
            _req(
                s,
                {"op": "alloc", "transfer_id": f"n{bad}", "keys": [b"k"], "sizes": [10], "lease_ms": bad},
                "alloc_ok",
            )
    assert r.stats().leases == 0
    s.close()


def test_shm_backend_maps_only_pdmesh_segments_on_this_host(tmp_path):
    from pdmesh.transfer.backend import host_id, pack_metadata
    from pdmesh.transfer.shm_backend import ShmBackend

    target = tmp_path / "victim"
    target.write_bytes(b"\0" * 4096)
    b = ShmBackend(FP)
    for seg in ("../../" + str(target).lstrip("/"), "/etc/passwd", "pdmesh-../../x", "psm_123"):
        md = pack_metadata("shm", FP, {"segment": seg, "size": 4096, "host": host_id()})
        with pytest.raises(IncompatiblePeer):
            b.connect(md)
    pool = ReferencePool(4096, 1)
    try:  # a real segment, but the peer only echoes our host id: no proof it shares /dev/shm
        md = pack_metadata("shm", FP, {"segment": pool.segment_name, "size": 4096, "host": host_id()})
        with pytest.raises(IncompatiblePeer):
            b.connect(md)
        real = ShmBackend(FP)
        real.register_memory(pool.buffer, pool.segment_name)
        assert b.connect(real.local_metadata()) == pool.segment_name
        b.disconnect(pool.segment_name)
    finally:
        b.close()
        pool.close()
    assert target.read_bytes() == b"\0" * 4096


def test_segments_reserve_their_memory_and_dead_processes_segments_are_swept(tmp_path, monkeypatch):
    """/dev/shm too small fails at creation with the sizes and the setting to change (not SIGBUS later); a
    SIGKILLed owner's segment is removed by the next sweep, a live owner's is kept."""
    import shutil
    import subprocess

    from pdmesh.transfer import segment

    mnt = tmp_path / "shm"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(segment, "SHM_DIR", str(mnt))
        with pytest.raises(segment.SegmentSpaceError) as e:
            segment.SharedSegment("pdmesh-tier-1-00000000", 8 << 20)
        assert "shm_size" in str(e.value.strerror) and "8 MiB" in e.value.strerror
        assert not any(mnt.iterdir())  # nothing left behind
        ok = segment.SharedSegment("pdmesh-tier-2-00000000", 256 << 10)
        dead = subprocess.Popen(["true"])
        dead.wait()  # a pid that no longer exists
        stale = mnt / f"pdmesh-tier-{dead.pid}-deadbeef"
        stale.write_bytes(b"x")
        live = mnt / f"pdmesh-tier-{os.getppid()}-0badcafe"
        live.write_bytes(b"x")
        assert segment.sweep_stale_segments() == [stale.name]
        assert live.exists() and not stale.exists()
        ok.close()
        live.unlink()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
