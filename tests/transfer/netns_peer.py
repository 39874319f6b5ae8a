"""One side of a transfer between two network namespaces (run inside one: ``python -m tests.transfer.netns_peer``).

``receive``: a receiver on ``--host`` over a fresh pool; prints ``{"address": [host, port]}``, then answers lines
on stdin: ``stats`` -> pool and receiver counters; ``check <seed> <chunks> <chunk_bytes>`` -> whether every chunk
``c{i}`` is committed with the seeded pattern's bytes; ``free <chunks>`` -> consume them; ``quit``.

``send``: pushes ``--chunks`` chunks of ``--chunk-bytes`` (the seeded pattern) to ``--peer`` in one push per
``--per-push`` chunks over ``--backend`` (keys ``c{i}``), then ``--repeat`` more times (keys ``r{n}c{i}``: warm
pushes on the same connection); prints ``{"ok": ...}`` with the backend, the cold push's seconds and the warm
pushes' GB/s, or the typed error; with ``--step`` it answers one warm push per ``push`` line on stdin instead.
Both sides use the cluster token ``--token``.

``socket-receive`` / ``socket-send``: one bare TCP stream carrying the same bytes per push (no transfer layer):
the link's ceiling for the benchmark.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time

from pdmesh.transfer.errors import TransferError
from pdmesh.transfer.receiver import Receiver, ReceiverConfig
from pdmesh.transfer.reference_pool import ReferencePool
from pdmesh.transfer.sender import Chunk, Sender, SenderConfig
from tests.transfer._procs import pattern

FP = "netns-test"


def _backend(name: str, token: str, host: str):
    if name == "tcp":
        from pdmesh.transfer.tcp_backend import TcpBackend

        return TcpBackend(FP, token, host, host)
    from pdmesh.transfer.nixl_backend import NixlBackend

    return NixlBackend(FP)  # the product's defaults (a veth device: UCX's progress thread on)


def _print(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def receive(a: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM still unlinks the pool's segment
    pool = ReferencePool(
        a.chunk_bytes, a.slots, prefault=True
    )  # as the tier's pool: no faults on the data path
    cfg = ReceiverConfig(fingerprint=FP, host=a.host, port=0, token=a.token)
    rx = Receiver(pool, cfg, [_backend(b, a.token, a.host) for b in a.backend.split(",")])
    _, port = rx.start()
    _print({"address": [a.host, port]})
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            if cmd[0] == "stats":
                ps, rs = pool.stats(), rx.stats()
                _print(
                    {"leased": ps.leased, "ready": ps.ready, "leases": rs.leases, "committed": rs.committed}
                )
            elif cmd[0] == "free":  # consume chunks c0..c{n-1}: the next push of the same keys writes again
                _print({"freed": sum(pool.consume(f"c{i}".encode()) for i in range(int(cmd[1])))})
            elif cmd[0] == "check":
                seed, n, size = int(cmd[1]), int(cmd[2]), int(cmd[3])
                want = pattern(seed, n * size).tobytes()
                got = [pool.get(f"c{i}".encode()) for i in range(n)]
                same = all(
                    g is not None and bytes(g) == want[i * size : (i + 1) * size] for i, g in enumerate(got)
                )
                _print({"intact": same, "present": sum(g is not None for g in got)})
    finally:
        rx.close()
        pool.close()


def _push_round(
    sender: Sender, a: argparse.Namespace, peer: tuple[str, int], round_: int
) -> tuple[float, str]:
    """One round of pushes (keys ``c{i}`` in round 0, ``r{n}c{i}`` after): seconds taken and the backend used."""
    prefix = "" if round_ == 0 else f"r{round_}"
    t0 = time.perf_counter()
    backend = ""
    for first in range(0, a.chunks, a.per_push):
        chunks = [
            Chunk(f"{prefix}c{i}".encode(), i * a.chunk_bytes, a.chunk_bytes)
            for i in range(first, min(a.chunks, first + a.per_push))
        ]
        result = sender.push(peer, f"x{a.seed}-{round_}-{first}", chunks, time.monotonic() + a.deadline)
        backend = result.backend
    return time.perf_counter() - t0, backend


def send(a: argparse.Namespace) -> None:
    if a.step:
        return send_steps(a)
    total = a.chunks * a.chunk_bytes
    buf = memoryview(bytearray(pattern(a.seed, total).tobytes()))
    factory = {a.backend: lambda: _backend(a.backend, a.token, a.host)}
    sender = Sender(buf, SenderConfig(fingerprint=FP, token=a.token, backends=(a.backend,)), factory)
    host, port = a.peer.rsplit(":", 1)
    times: list[float] = []
    backend = None
    try:
        for round_ in range(1 + a.repeat):  # round 0 (keys c{i}) is cold: connection, agent, registration
            seconds, backend = _push_round(sender, a, (host, int(port)), round_)
            times.append(seconds)
        warm = sorted(times[1:]) or times
        gbps = total / warm[len(warm) // 2] / 1e9
        _print({"ok": True, "backend": backend, "bytes": total, "cold_s": times[0], "seconds": sum(times),
                "gbps": gbps, "warm_gbps": [total / t / 1e9 for t in times[1:]]})  # fmt: skip
    except TransferError as e:
        _print(
            {"ok": False, "code": e.code, "retryable": e.retryable, "error": str(e), "seconds": sum(times)}
        )
    finally:
        sender.close()


def send_steps(a: argparse.Namespace) -> None:
    """``send --step``: the cold push, then one warm push per ``push`` line on stdin (``quit`` ends), each answered
    with ``{"ok", "gbps"}``: a benchmark interleaves several senders push by push, so that the same background
    load falls on each of them."""
    total = a.chunks * a.chunk_bytes
    buf = memoryview(bytearray(pattern(a.seed, total).tobytes()))
    factory = {a.backend: lambda: _backend(a.backend, a.token, a.host)}
    sender = Sender(buf, SenderConfig(fingerprint=FP, token=a.token, backends=(a.backend,)), factory)
    host, port = a.peer.rsplit(":", 1)
    try:
        seconds, backend = _push_round(sender, a, (host, int(port)), 0)
        _print({"ok": True, "backend": backend, "cold_s": seconds})
        for round_, line in enumerate(sys.stdin, 1):
            if line.strip() != "push":
                break
            seconds, _ = _push_round(sender, a, (host, int(port)), round_)
            _print({"ok": True, "gbps": total / seconds / 1e9})
    except TransferError as e:
        _print({"ok": False, "code": e.code, "retryable": e.retryable, "error": str(e)})
    finally:
        sender.close()


def socket_receive(a: argparse.Namespace) -> None:
    """``socket-receive``: the link's ceiling for one TCP stream, no transfer layer: each push is an 8-byte length
    then that many bytes, read with ``recv_into`` into one buffer, answered with one byte."""
    ls = socket.create_server((a.host, 0))
    _print({"address": [a.host, ls.getsockname()[1]]})
    conn, _ = ls.accept()
    buf = memoryview(bytearray(a.chunks * a.chunk_bytes))
    with conn:
        while hdr := conn.recv(8, socket.MSG_WAITALL):
            n, got = int.from_bytes(hdr, "big"), 0
            while got < n:
                k = conn.recv_into(buf[got:n])
                if not k:
                    return
                got += k
            conn.sendall(b"k")


def socket_send(a: argparse.Namespace) -> None:
    """``socket-send --step``: the counterpart of ``socket-receive``, one push of the request's bytes per ``push``
    line (``sendall`` of the whole buffer), answered like ``send --step``."""
    total = a.chunks * a.chunk_bytes
    buf = memoryview(bytearray(pattern(a.seed, total).tobytes()))
    host, port = a.peer.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _print({"ok": True, "backend": "socket", "cold_s": 0.0})
        for line in sys.stdin:
            if line.strip() != "push":
                break
            t0 = time.perf_counter()
            s.sendall(total.to_bytes(8, "big"))
            s.sendall(buf)
            s.recv(1)
            _print({"ok": True, "gbps": total / (time.perf_counter() - t0) / 1e9})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["receive", "send", "socket-receive", "socket-send"])
    ap.add_argument("--host", required=True)
    ap.add_argument("--backend", default="tcp")
    ap.add_argument("--token", default="netns-secret")
    ap.add_argument("--chunk-bytes", type=int, default=1536 << 10)
    ap.add_argument("--slots", type=int, default=80)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--per-push", type=int, default=64)
    ap.add_argument("--peer", default="")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=0, help="timed pushes after the cold one (new keys each)")
    ap.add_argument("--step", action="store_true", help="send: one warm push per 'push' line on stdin")
    a = ap.parse_args()
    {"receive": receive, "send": send, "socket-receive": socket_receive, "socket-send": socket_send}[a.mode](
        a
    )


if __name__ == "__main__":
    main()
