"""The tier server's control socket: the protocol the vLLM connector speaks to its node's tier.

Unix socket, :mod:`pdmesh.frames` frames, one request at a time per connection. Every request is
``{"id": int, "op": str, ...}``; every reply ``{"id": same, "ok": true, ...}`` or
``{"id": same, "ok": false, "error": kind, "message": str}``. The first request must be ``hello`` with the cluster
token; a connection whose first request fails is closed. Keys are 16-byte msgpack bin. The ops (:data:`OPS`):

- ``hello {token, proto?, fingerprint?: dict, chunk_tokens?: int}`` -> ``{proto, segment, pool_bytes, slot_bytes,
  num_slots, chunk_tokens}`` (the latest fingerprint and chunk size a connector tells are the engine's; a
  configured fingerprint stays)
- ``lookup {keys, remote?: bool}`` -> ``{n, tiers}``: the longest prefix held by any tier and, per key, where
  (``memory``/``disk``/``remote``). No data moves.
- ``load {keys}`` -> ``{n, locs: [[offset, length], ...]}``: brings the longest available prefix into the pool
  (disk/remote reads land directly in pool slots) and takes an in-use reference on each; the caller copies from
  shared memory and then sends ``release``.
- ``alloc {keys, nbytes: int | [int], lease_s?}`` -> ``{locs: [[offset, length] | null], full: bool}`` (null: key
  present or in flight; ``full``: pool exhausted, the list stops there). The caller writes the bytes into the
  segment, then ``commit {keys}`` -> ``{n}`` (ready; written through to disk/remote in the background) or
  ``abort {keys}`` -> ``{n}``.
- ``push {keys, peer: "host:port", transfer_id, deadline_s}`` -> ``{queued}``: PD push mode; send these ready
  chunks to the decode node's transfer receiver in the background (``pdmesh.transfer.sender``). Answers at once;
  a failed push is logged and counted, and the decoder computes what did not arrive.
- ``pin``/``unpin``/``release {keys}`` -> ``{n}``; ``stats`` -> ``{stats}``; ``clear {tiers?}`` -> ``{cleared}``.

Ownership: what a connection allocates without a lease, pins or loads is recorded on its :class:`Conn`; when the
connection closes, uncommitted allocations are aborted and pins and in-use references dropped, so they return to
zero when clients go away. Allocations with a lease are reclaimed by the pool's reaper instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pdmesh.frames import FrameError, encode_frame, read_frame
from pdmesh.kvcache.errors import KVCacheError
from pdmesh.kvcache.keys import KEY_BYTES, ModelFingerprint
from pdmesh.kvcache.pool import PoolFull
from pdmesh.kvcache.tier import Tier
from pdmesh.kvcache.transfer_node import parse_address
from pdmesh.security import token_matches

log = logging.getLogger("pdmesh.tier")

CONTROL_PROTO = 1


class ControlError(KVCacheError):
    """A refused control request; ``kind`` goes on the wire as the reply's ``error``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Conn:
    """What one control connection holds (released when it closes)."""

    authed: bool = False
    fp: bytes | None = None
    allocs: set[bytes] = field(default_factory=set)  # uncommitted, no lease
    pins: Counter = field(default_factory=Counter)
    refs: Counter = field(default_factory=Counter)


Handler = Callable[[Tier, Conn, dict], Awaitable[dict]]


def parse_keys(msg: dict) -> list[bytes]:
    keys = msg.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in keys):
        raise ControlError("bad_request", f"keys must be a list of {KEY_BYTES}-byte binaries")
    return keys


HELLO_TIMEOUT_S = 5.0  # a new connection must send its hello within this long
PRE_AUTH_MAX_FRAME = 16 << 10  # and in a frame no larger than this


async def serve_control(tier: Tier, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one control connection until it closes; frees what it held. Before its hello is accepted a
    connection gets one frame of at most :data:`PRE_AUTH_MAX_FRAME` bytes within :data:`HELLO_TIMEOUT_S`."""
    conn = Conn()
    try:
        while True:
            try:
                if conn.authed:
                    msg = await read_frame(reader)
                else:
                    msg = await asyncio.wait_for(read_frame(reader, PRE_AUTH_MAX_FRAME), HELLO_TIMEOUT_S)
            except (asyncio.IncompleteReadError, ConnectionError, FrameError, asyncio.TimeoutError):
                return
            rid = msg.get("id")
            try:
                reply = await dispatch(tier, conn, msg)
                reply = {"id": rid, "ok": True, **reply}
            except ControlError as e:
                reply = {"id": rid, "ok": False, "error": e.kind, "message": str(e)}
            except Exception as e:  # never let one bad request kill the server
                log.exception("control op %r failed", msg.get("op"))
                reply = {"id": rid, "ok": False, "error": "internal", "message": repr(e)}
            writer.write(encode_frame(reply))
            await writer.drain()
            if not conn.authed:
                return
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        drop_conn(tier, conn)
        writer.close()


def drop_conn(tier: Tier, conn: Conn) -> None:
    pool = tier.pool
    for k in conn.allocs:
        pool.abort(k)
    for k, n in conn.pins.items():
        pool.unpin([k] * n)
    for k, n in conn.refs.items():
        pool.release([k] * n)
    conn.allocs.clear()
    conn.pins.clear()
    conn.refs.clear()


async def dispatch(tier: Tier, conn: Conn, msg: dict) -> dict:
    op = msg.get("op")
    if op == "hello":
        return _hello(tier, conn, msg)
    if not conn.authed:
        raise ControlError("unauthorized", "send hello with the cluster token first")
    handler = OPS.get(op) if isinstance(op, str) else None
    if handler is None:
        raise ControlError("bad_request", f"unknown op {op!r}")
    return await handler(tier, conn, msg)


def _hello(tier: Tier, conn: Conn, msg: dict) -> dict:
    if msg.get("proto", CONTROL_PROTO) != CONTROL_PROTO:
        raise ControlError("protocol", f"control protocol {msg.get('proto')} != {CONTROL_PROTO}")
    if not token_matches(msg.get("token"), tier.token):
        raise ControlError("unauthorized", "bad cluster token")
    conn.authed = True
    fp = msg.get("fingerprint")
    if fp:
        try:
            mf = ModelFingerprint.from_dict(fp)
        except TypeError as e:
            raise ControlError("bad_request", f"fingerprint: {e}") from e
        conn.fp = mf.digest()
        if tier.fingerprint != mf and not tier.config.fingerprint:
            # the latest engine's (a restart with another config replaces it); an operator's configured one stays
            tier.fingerprint = mf
    chunk = msg.get("chunk_tokens")
    if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0:
        tier.engine_chunk_tokens = chunk  # the engine's chunk size: /lookup by token ids chunks alike
    pool = tier.pool
    return {
        "proto": CONTROL_PROTO,
        "segment": pool.segment_name,
        "pool_bytes": pool.capacity_bytes,
        "slot_bytes": pool.slot_bytes,
        "num_slots": pool.num_slots,
        "chunk_tokens": tier.config.chunk_tokens,
    }


async def _lookup(tier: Tier, conn: Conn, msg: dict) -> dict:
    n, tiers = await tier.lookup(parse_keys(msg), bool(msg.get("remote", True)))
    return {"n": n, "tiers": tiers}


async def _load(tier: Tier, conn: Conn, msg: dict) -> dict:
    locs = await tier.load(parse_keys(msg), conn.fp, conn.refs)
    return {"n": len(locs), "locs": [list(x) for x in locs]}


async def _alloc(tier: Tier, conn: Conn, msg: dict) -> dict:
    keys, nbytes, lease_s = parse_keys(msg), msg.get("nbytes"), msg.get("lease_s")
    sizes = nbytes if isinstance(nbytes, list) else [nbytes] * len(keys)
    if len(sizes) != len(keys) or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ControlError("bad_request", "nbytes must be a positive int or one per key")
    if lease_s is not None and not (isinstance(lease_s, (int, float)) and lease_s > 0):
        raise ControlError("bad_request", "lease_s must be a positive number")
    meta = {"fp": conn.fp} if conn.fp else None
    locs: list[list[int] | None] = []
    full = False
    for k, size in zip(keys, sizes, strict=True):
        try:
            a = tier.pool.alloc(k, size, lease_s, meta)
        except PoolFull:
            full = True
            break
        except ValueError as e:
            raise ControlError("too_large", str(e)) from e
        if a is None:
            locs.append(None)
            continue
        if lease_s is None:
            conn.allocs.add(k)
        locs.append([a.offset, a.length])
    tier.after_alloc()
    return {"locs": locs, "full": full}


async def _commit(tier: Tier, conn: Conn, msg: dict) -> dict:
    keys = parse_keys(msg)
    done = []
    for k in keys:
        if tier.pool.commit(k):
            done.append(k)
        conn.allocs.discard(k)
    for k in done:
        loc = tier.pool.locate(k)
        if loc is not None:
            tier.counters["memory"]["bytes_written"] += loc.length
    tier.schedule_writeback(done)
    return {"n": len(done)}


async def _abort(tier: Tier, conn: Conn, msg: dict) -> dict:
    keys = parse_keys(msg)
    n = sum(1 for k in keys if tier.pool.abort(k))
    conn.allocs.difference_update(keys)
    return {"n": n}


async def _pin(tier: Tier, conn: Conn, msg: dict) -> dict:
    n = 0
    for k in parse_keys(msg):
        if tier.pool.pin([k]):
            conn.pins[k] += 1
            n += 1
    return {"n": n}


def _dropper(which: str) -> Handler:
    """``unpin`` or ``release``: drop holds this connection has (never another connection's)."""

    async def drop(tier: Tier, conn: Conn, msg: dict) -> dict:
        held = conn.pins if which == "unpin" else conn.refs
        fn = tier.pool.unpin if which == "unpin" else tier.pool.release
        n = 0
        for k in parse_keys(msg):
            if held[k] > 0 and fn([k]):
                held[k] -= 1
                n += 1
            if held[k] <= 0:
                del held[k]
        return {"n": n}

    return drop


async def _push(tier: Tier, conn: Conn, msg: dict) -> dict:
    if tier.transfer is None:
        raise ControlError("unavailable", "this tier server has no transfer endpoint (transfer.enabled)")
    keys, peer, tid = parse_keys(msg), msg.get("peer"), msg.get("transfer_id")
    deadline_s = msg.get("deadline_s", 10.0)
    if not isinstance(peer, str) or not isinstance(tid, str) or not isinstance(deadline_s, (int, float)):
        raise ControlError("bad_request", "push needs peer (host:port), transfer_id and deadline_s")
    try:
        parse_address(peer)
    except ValueError as e:
        raise ControlError("bad_request", str(e)) from None
    tier.start_push(keys, peer, tid, float(deadline_s))
    return {"queued": len(keys)}


async def _stats(tier: Tier, conn: Conn, msg: dict) -> dict:
    return {"stats": tier.stats()}


async def _clear(tier: Tier, conn: Conn, msg: dict) -> dict:
    return {"cleared": await tier.clear_async(list(msg.get("tiers") or ["memory"]))}


OPS: dict[str, Handler] = {
    "lookup": _lookup,
    "load": _load,
    "alloc": _alloc,
    "commit": _commit,
    "abort": _abort,
    "pin": _pin,
    "unpin": _dropper("unpin"),
    "release": _dropper("release"),
    "push": _push,
    "stats": _stats,
    "clear": _clear,
}
"""Every op after ``hello``: name -> handler. The docstring above documents each."""
