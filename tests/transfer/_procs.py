"""Child-process entry points for the transfer tests (spawned with multiprocessing's spawn context)."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import numpy as np

os.environ.setdefault("UCX_NET_DEVICES", "lo")

from pdmesh.transfer.errors import TransferError
from pdmesh.transfer.receiver import Receiver, ReceiverConfig
from pdmesh.transfer.reference_pool import ReferencePool
from pdmesh.transfer.sender import Chunk, Sender, SenderConfig

MiB = 1 << 20


def make_backend(name: str, fingerprint: str, token: str = ""):
    if name == "tcp":
        from pdmesh.transfer.tcp_backend import TcpBackend

        return TcpBackend(fingerprint, token)
    if name == "shm":
        from pdmesh.transfer.shm_backend import ShmBackend

        return ShmBackend(fingerprint)
    from pdmesh.transfer.nixl_backend import NixlBackend

    return NixlBackend(fingerprint)


def pattern(seed: int, nbytes: int) -> np.ndarray:
    """The sender's buffer contents, reproducible by the receiver for checking."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_parent(conn: Any, limit_s: float = 120.0) -> None:
    conn.poll(limit_s)  # returns when the parent sends anything or closes the pipe


def run_receiver(conn: Any, backend: str, fingerprint: str, kill_on: str | None) -> None:
    """Serve a receiver over a fresh pool; report its address. ``kill_on``: "write" (TCP: SIGKILL when a write
    is admitted, i.e. mid-write) or "commit" (SIGKILL when COMMIT arrives, after a one-sided write)."""

    class Dying(Receiver):
        def begin_write(self, notif, segments):
            if kill_on == "write":
                _die()
            return super().begin_write(notif, segments)

        def _commit(self, tid):
            if kill_on == "commit":
                _die()
            return super()._commit(tid)

    pool = ReferencePool(4 * MiB, 32)
    rx = Dying(pool, ReceiverConfig(fingerprint=fingerprint), [make_backend(backend, fingerprint)])
    conn.send(rx.start())
    _wait_for_parent(conn)
    rx.close()
    pool.close()


def run_sender(
    conn: Any,
    backend: str,
    fingerprint: str,
    address: tuple[str, int],
    seed: int,
    transfers: int,
    chunks_per_transfer: int,
    chunk_bytes: int,
    threads: int,
    die_mid_transfer: bool = False,
) -> None:
    """Push ``transfers`` transfers from ``threads`` threads. Transfer t, chunk i: key b"t{t}-{i}", local offset
    (t * chunks_per_transfer + i) * chunk_bytes of the seeded pattern. Reports ("ok", results) or
    ("error", code, retryable, message). ``die_mid_transfer``: SIGKILL in the middle of the first WRITE."""
    total = transfers * chunks_per_transfer * chunk_bytes
    buf = memoryview(bytearray(pattern(seed, total).tobytes()))
    factory = {backend: (lambda: make_backend(backend, fingerprint))}
    if die_mid_transfer:
        factory = {backend: lambda: _dying_backend(make_backend(backend, fingerprint))}
    sender = Sender(buf, SenderConfig(fingerprint=fingerprint, backends=(backend,)), factory)
    results: list[Any] = []
    lock = threading.Lock()

    def work(ts: list[int]) -> None:
        for t in ts:
            chunks = [
                Chunk(f"t{t}-{i}".encode(), (t * chunks_per_transfer + i) * chunk_bytes, chunk_bytes)
                for i in range(chunks_per_transfer)
            ]
            try:
                r = sender.push(address, f"xfer-{seed}-{t}", chunks, time.monotonic() + 20)
                item: Any = ("ok", r.backend, len(r.written), len(r.skipped))
            except TransferError as exc:
                item = ("error", exc.code, exc.retryable, str(exc))
            with lock:
                results.append(item)

    pool = [threading.Thread(target=work, args=(list(range(k, transfers, threads)),)) for k in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(60)
    conn.send(results)
    sender.close()


def _dying_backend(b):
    """Wrap a sender backend so the process is SIGKILLed in the middle of its first write."""
    real_wait = b.wait
    if b.name == "tcp":
        from pdmesh.transfer.protocol import send_frame

        def wait(handle, deadline):
            p = b._peers[handle.peer]
            segs = [[s.remote_offset, s.length] for s in handle.segments]
            send_frame(p.sock, {"op": "write", "notif": handle.notif, "segs": segs}, deadline)
            first = handle.segments[0]
            p.sock.sendall(b._buf[first.local_offset : first.local_offset + first.length // 2])
            time.sleep(0.2)
            _die()

    else:

        def wait(handle, deadline):  # one-sided write lands, then the sender dies before COMMIT
            real_wait(handle, deadline)
            _die()

    b.wait = wait
    return b
