"""Malformed frames for ``bench/bench_fuzz.py``'s binary-listener phase: random bytes, lying length prefixes,
undecodable msgpack, maps of the wrong shape before authentication and every op with fuzzed arguments after it
(:func:`gen_frames`), the three targets (the tier's control socket, the transfer receiver, the cache server:
connect + authenticate with the cluster ``token``) and one batch sent and classified (:func:`send_frames`)."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable

import msgpack

from pdmesh.frames import encode_frame, recv_frame
from pdmesh.transfer.peer_auth import client_handshake
from pdmesh.transfer.protocol import PROTOCOL_VERSION

TRANSFER_FP = "pdmesh-kv-v1"


def _lp(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _rand_value(rng: random.Random, depth: int = 0):
    choices = [
        lambda: None, lambda: rng.randrange(-(2**63), 2**63), lambda: rng.random() * 1e300, lambda: float("nan"),
        lambda: float("inf"), lambda: "s" * rng.randrange(0, 300), lambda: bytes(rng.randrange(0, 40)),
        lambda: os.urandom(16), lambda: True, lambda: -1, lambda: 0, lambda: 2**64 - 1,
    ]  # fmt: skip
    if depth < 2:
        choices += [
            lambda: [_rand_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))],
            lambda: [os.urandom(16)] * rng.choice([1, 1000, 100_000]),
            lambda: {str(i): _rand_value(rng, depth + 1) for i in range(rng.randrange(0, 4))},
        ]
    return rng.choice(choices)()


TARGET_OPS = {
    "tier": [
        "lookup",
        "load",
        "alloc",
        "commit",
        "abort",
        "push",
        "pin",
        "unpin",
        "release",
        "stats",
        "clear",
        "x",
    ],
    "cache": ["put", "get", "contains", "delete", "clear", "stats", "hello", "y"],
    "transfer": ["alloc", "commit", "abort", "hello", "auth", "z"],
}
ARG_NAMES = ["keys", "nbytes", "lease_s", "peer", "transfer_id", "deadline_s", "tiers", "remote", "key", "fp", "n",
             "csum", "sizes", "lease_ms", "offsets", "token", "proof", "nonce", "v", "id"]  # fmt: skip


def gen_frames(rng: random.Random, target: str) -> tuple[str, bool, list[bytes]]:
    """(kind, authenticate first?, raw byte strings to send)."""
    if rng.random() < 0.45:  # pre-auth garbage
        variant = rng.choice(
            ["bytes", "huge-len", "zero-len", "bad-msgpack", "non-map", "short", "wrong-hello"]
        )
        if variant == "bytes":
            data = [os.urandom(rng.randrange(1, 64))]
        elif variant == "huge-len":
            data = [_lp(rng.choice([2**32 - 1, 1 << 24, 1 << 21])) + os.urandom(16)]
        elif variant == "zero-len":
            data = [_lp(0)]
        elif variant == "bad-msgpack":
            body = b"\xc1" + os.urandom(rng.randrange(0, 30))
            data = [_lp(len(body)) + body]
        elif variant == "non-map":
            body = msgpack.packb(rng.choice([[1, 2], 5, "hello", b"\x00" * 8, None]))
            data = [_lp(len(body)) + body]
        elif variant == "short":
            data = [_lp(100) + os.urandom(10)]
        else:
            msg = {"op": "hello", "id": 1, "token": _rand_value(rng), "proto": _rand_value(rng),
                   "v": _rand_value(rng), "fingerprint": _rand_value(rng), "backends": _rand_value(rng),
                   "nonce": _rand_value(rng)}  # fmt: skip
            data = [encode_frame(msg, 1 << 30)]
        return f"pre-auth:{variant}", False, data
    op = rng.choice(TARGET_OPS[target])
    msg = {"op": op, "id": rng.randrange(1 << 31)}
    for name in rng.sample(ARG_NAMES, rng.randrange(0, 6)):
        msg[name] = _rand_value(rng)
    try:
        frame = encode_frame(msg, 1 << 30)
    except Exception:
        frame = _lp(3) + b"\xc1\xc1\xc1"
    if rng.random() < 0.1:
        frame = frame[: rng.randrange(1, len(frame))]  # cut short, then close
    return f"post-auth:{op}", True, [frame]


class FrameTarget:
    """How to reach one binary listener, authenticate on it and check that it still serves correctly."""

    def __init__(
        self, name: str, connect: Callable[[], socket.socket], auth: Callable[[socket.socket], None]
    ):
        self.name, self.connect, self.auth = name, connect, auth


def _hello_auth(hello: dict) -> Callable[[socket.socket], None]:
    """Authentication by one ``hello`` frame carrying the token, answered ``ok`` (the tier's control socket and the
    cache server speak it)."""

    def auth(s: socket.socket) -> None:
        s.sendall(encode_frame(hello))
        reply = recv_frame(s, 1 << 20, time.monotonic() + 5)
        assert reply.get("ok"), reply

    return auth


def tier_target(socket_path: str, token: str) -> FrameTarget:
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(socket_path)
        return s

    return FrameTarget("tier-control", connect, _hello_auth({"id": 0, "op": "hello", "token": token}))


def cache_target(host: str, port: int, token: str) -> FrameTarget:
    def connect() -> socket.socket:
        return socket.create_connection((host, port), timeout=5)

    return FrameTarget("cache-server", connect, _hello_auth({"op": "hello", "proto": 1, "token": token}))


def transfer_target(host: str, port: int, token: str) -> FrameTarget:
    def connect() -> socket.socket:
        return socket.create_connection((host, port), timeout=5)

    def auth(s: socket.socket) -> None:
        hello = {"op": "hello", "v": PROTOCOL_VERSION, "fingerprint": TRANSFER_FP, "backends": ["tcp"]}
        client_handshake(s, hello, "hello_ok", token, time.monotonic() + 5)

    return FrameTarget("transfer-receiver", connect, auth)


def send_frames(target: FrameTarget, authenticate: bool, frames: list[bytes]) -> str:
    """Outcome: 'reply:<ok|error kind>', 'closed', 'timeout' (no answer within 6 s: the server waits, allowed for
    a frame cut short) or 'auth-failed' (a correct client was refused: a finding)."""
    try:
        s = target.connect()
    except OSError:
        return "connect-failed"
    with s:
        s.settimeout(6)
        if authenticate:
            try:
                target.auth(s)
            except Exception as e:  # a correct client refused: reported
                return f"auth-failed:{type(e).__name__}"
        try:
            for f in frames:
                s.sendall(f)
            reply = recv_frame(s, 1 << 26, time.monotonic() + 6)
        except TimeoutError:
            return "timeout"
        except (OSError, ConnectionError):
            return "closed"
        except Exception:
            return "reply:undecodable"
    if reply.get("ok") is True or reply.get("op", "").endswith("_ok"):
        return "reply:ok"
    return f"reply:{reply.get('error') or reply.get('kind') or reply.get('op')}"


# -- the run --------------------------------------------------------------------------------------------------
