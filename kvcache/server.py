"""The tier server: one process per worker node owning the node's KV memory pool, disk tier and remote client.

Two faces, one asyncio loop:

* **Control socket** (unix, for the vLLM connector; :mod:`kvcache.wire` frames, one request at a time per
  connection). Every request is ``{"id": int, "op": str, ...}``; every reply ``{"id": same, "ok": true, ...}`` or
  ``{"id": same, "ok": false, "error": kind, "message": str}``. The first request must be ``hello`` with the
  cluster token. Ops (keys are 16-byte msgpack bin):

  - ``hello {token, fingerprint?: dict}`` -> ``{proto, segment, pool_bytes, slot_bytes, num_slots, chunk_tokens}``
  - ``lookup {keys, remote?: bool}`` -> ``{n, tiers}``: the longest prefix held by any tier and, per key, where
    (``memory``/``disk``/``remote``). No data moves.
  - ``load {keys}`` -> ``{n, locs: [[offset, length], ...]}``: brings the longest available prefix into the pool
    (disk/remote reads land directly in pool slots) and takes an in-use reference on each; the caller copies
    from shared memory and then sends ``release``.
  - ``alloc {keys, nbytes, lease_s?}`` -> ``{locs: [[offset, length] | null], full: bool}`` (null: key present;
    ``full``: pool exhausted, the list stops there). The caller writes the bytes into the segment, then
    ``commit {keys}`` -> ``{n}`` (ready; written through to disk/remote in the background) or ``abort {keys}``.
  - ``pin``/``unpin``/``release {keys}`` -> ``{n}``; ``stats`` -> ``{stats}``; ``clear {tiers?}`` -> ``{cleared}``.

  When a connection closes, its uncommitted allocations without a lease are aborted and its pins and in-use
  references are dropped, so pins return to zero when clients go away.
* **HTTP** (operators and the router): ``GET /health`` (no token), ``GET /metrics`` (Prometheus, no token),
  ``GET /stats``, ``POST /lookup`` (``{"keys": [hex]}`` or ``{"token_ids": [...], "fingerprint"?: {...},
  "chunk_tokens"?: int}``), ``POST /clear`` (``{"tiers": ["memory", "disk", "remote"]}``); those three need the
  cluster token in ``X-PDMesh-Token``.

Blocking work (disk and remote I/O) runs in threads (``asyncio.to_thread``); remote calls are bounded by the
remote's timeouts and a circuit breaker, so a dead remote makes lookups miss quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response

from pdmesh.kvcache.config import TierConfig
from pdmesh.kvcache.disk import DiskTier
from pdmesh.kvcache.keys import KEY_BYTES, ModelFingerprint, chain_keys, key_from_hex
from pdmesh.kvcache.metrics import make_registry, render
from pdmesh.kvcache.pool import ChunkPool, PoolFull
from pdmesh.kvcache.remote import CircuitBreaker, GuardedRemote, open_remote
from pdmesh.kvcache.transfer_node import TransferNode, parse_address
from pdmesh.kvcache.wire import ProtocolError, encode_frame, read_frame
from pdmesh.security import TOKEN_HEADER, require_token_for_bind, token_matches
from pdmesh.transfer.errors import TransferError

log = logging.getLogger("pdmesh.tier")

CONTROL_PROTO = 1
READY_PREFIX = "PDMESH_TIER_READY "


class ControlError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Conn:
    authed: bool = False
    fp: bytes | None = None
    allocs: set[bytes] = field(default_factory=set)  # uncommitted, no lease
    pins: Counter = field(default_factory=Counter)
    refs: Counter = field(default_factory=Counter)


def _keys(msg: dict) -> list[bytes]:
    keys = msg.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in keys):
        raise ControlError("bad_request", f"keys must be a list of {KEY_BYTES}-byte binaries")
    return keys


class TierServer:
    """Owns the pool, disk and remote tiers. ``await start()``, then ``await wait_closed()`` or ``await close()``."""

    def __init__(self, config: TierConfig) -> None:
        self.config = config
        self.token = config.resolved_token()
        self.socket_path = config.resolved_socket_path()
        self.pool = ChunkPool(
            config.slot_bytes,
            config.num_slots,
            name=config.segment_name,
            lease_grace_s=config.lease_grace_s,
            spill=config.disk.enabled and config.disk.spill,
            prefault=config.prefault,
        )
        self.disk: DiskTier | None = None
        self.remote: GuardedRemote | None = None
        try:
            if config.disk.enabled:
                self.disk = DiskTier(config.disk.path, config.disk.max_bytes, fsync=config.disk.fsync)
            if config.remote.url:
                r = config.remote
                tier = open_remote(
                    r.url, self.token, timeout_s=r.timeout_s, connect_timeout_s=r.connect_timeout_s
                )
                self.remote = GuardedRemote(tier, CircuitBreaker(r.breaker_failures, r.breaker_cooldown_s))
        except BaseException:
            self.pool.close()
            raise
        self.transfer: TransferNode | None = None
        self._pushes: set[asyncio.Task] = set()
        self.fingerprint: ModelFingerprint | None = (
            ModelFingerprint.from_dict(config.fingerprint) if config.fingerprint else None
        )
        self.counters: dict[str, Counter] = {t: Counter() for t in ("memory", "disk", "remote")}
        self.registry = make_registry(self._metrics_snapshot)
        self.http_port: int | None = None
        self._unix: asyncio.base_events.Server | None = None
        self._http = None
        self._tasks: list[asyncio.Task] = []
        self._writeback: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1024)
        self._spill_event = asyncio.Event()
        self._writeback_dropped = 0
        self._closed = asyncio.Event()
        self._conns: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        require_token_for_bind(self.config.host, self.token, "pdmesh tier-server")
        await asyncio.to_thread(self._prepare_socket_path)
        self._unix = await asyncio.start_unix_server(self._serve_control, path=self.socket_path)
        os.chmod(self.socket_path, 0o600)
        await self._start_http()
        if self.config.transfer.enabled:
            t = self.config.transfer
            self.transfer = TransferNode(
                self.pool, t.fingerprint, self.token, t.host, t.port, t.advertise_host, t.backends
            )
            await asyncio.to_thread(self.transfer.start)
        self._tasks += [
            asyncio.create_task(self._reaper(), name="tier-reaper"),
            asyncio.create_task(self._writeback_loop(), name="tier-writeback"),
            asyncio.create_task(self._spill_loop(), name="tier-spill"),
        ]

    def _prepare_socket_path(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.socket_path)), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def _start_http(self) -> None:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.http_port))
        self.http_port = sock.getsockname()[1]
        cfg = uvicorn.Config(self._make_app(), log_level="warning", lifespan="off", access_log=False)
        self._http = uvicorn.Server(cfg)
        self._http.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._tasks.append(asyncio.create_task(self._http.serve(sockets=[sock]), name="tier-http"))
        for _ in range(200):  # bounded: up to ~2 s for uvicorn to come up
            if self._http.started:
                break
            await asyncio.sleep(0.01)

    def _http_advertise_host(self) -> str:
        """The host others use for this server's HTTP API: the transfer advertise host when the HTTP bind is a
        wildcard (containers), else the bind host."""
        host = self.config.host.strip("[]")
        if host in ("0.0.0.0", "::", "") and self.config.transfer.advertise_host:
            host = self.config.transfer.advertise_host.strip("[]")
        return f"[{host}]" if ":" in host else host

    def ready_info(self) -> dict[str, Any]:
        return {
            "socket": self.socket_path,
            "http": f"http://{self._http_advertise_host()}:{self.http_port}",
            "segment": self.pool.segment_name,
            "pid": os.getpid(),
            "transfer": self.transfer.address if self.transfer is not None else None,
        }

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        """Stop serving, drop connections, flush nothing (the tier is a cache), unlink socket and segment."""
        if self._closed.is_set():
            return
        if self._http is not None:
            self._http.should_exit = True
        if self._unix is not None:
            self._unix.close()
        for w in list(self._conns):
            w.close()
        for t in self._tasks:
            if t.get_name() != "tier-http":
                t.cancel()
        await asyncio.wait(self._tasks, timeout=5)
        for t in list(self._pushes):
            t.cancel()
        if self.transfer is not None:
            await asyncio.to_thread(self.transfer.close)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        if self.remote is not None:
            await asyncio.to_thread(self.remote.close)
        self.pool.close()
        self._closed.set()

    # ------------------------------------------------------------------ background tasks
    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_interval_s)
            n = self.pool.reclaim_expired()
            if n:
                log.info("reclaimed %d expired leases", n)

    async def _spill_loop(self) -> None:
        while True:
            await self._spill_event.wait()
            self._spill_event.clear()
            for key, data, meta in self.pool.drain_spilled():
                if self.disk is not None:
                    with contextlib.suppress(OSError):
                        if await asyncio.to_thread(self.disk.put, key, data, meta.get("fp")):
                            self.counters["disk"]["bytes_written"] += len(data)

    def _after_alloc(self) -> None:
        if self.pool._spill:
            self._spill_event.set()

    def _schedule_writeback(self, keys: list[bytes]) -> None:
        want_disk = self.disk is not None and self.config.disk.write_through
        want_remote = self.remote is not None and self.config.remote.write_through
        if not (want_disk or want_remote):
            return
        for k in keys:
            try:
                self._writeback.put_nowait(k)
            except asyncio.QueueFull:
                self._writeback_dropped += 1

    async def _writeback_loop(self) -> None:
        while True:
            key = await self._writeback.get()
            view = self.pool.acquire(key)
            if view is None:
                continue
            try:
                meta = self.pool.meta(key) or {}
                fp = meta.get("fp")
                if self.disk is not None and self.config.disk.write_through:
                    with contextlib.suppress(OSError):
                        if await asyncio.to_thread(self.disk.put, key, view, fp):
                            self.counters["disk"]["bytes_written"] += len(view)
                if self.remote is not None and self.config.remote.write_through:
                    await asyncio.to_thread(self.remote.put, key, view, fp)
            finally:
                view.release()
                self.pool.release([key])

    # ------------------------------------------------------------------ tier operations
    async def lookup(self, keys: list[bytes], use_remote: bool = True) -> tuple[int, list[str]]:
        """Longest prefix of ``keys`` held by any tier, and which tier holds each."""
        n = self.pool.lookup(keys)
        tiers = ["memory"] * n
        self.counters["memory"]["hits"] += n
        rest = keys[n:]
        if rest and self.disk is not None:
            m = 0
            for k in rest:  # memory may hold later keys again (e.g. evicted middle chunk)
                if self.disk.contains([k]):
                    tiers.append("disk")
                elif self.pool.locate(k) is not None:
                    tiers.append("memory")
                else:
                    break
                m += 1
            rest = rest[m:]
        if rest and self.remote is not None and use_remote and self.config.remote.lookup:
            timeout = self.config.remote.timeout_s + self.config.remote.connect_timeout_s
            try:
                m = await asyncio.wait_for(asyncio.to_thread(self.remote.contains, rest), timeout)
            except asyncio.TimeoutError:
                m = 0
            tiers += ["remote"] * m
        return len(tiers), tiers

    async def _fill_from(self, tier: str, key: bytes, fp: bytes | None) -> bool:
        """Allocate a slot for ``key`` and read it from disk/remote straight into it. True when ready."""
        try:
            a = self.pool.alloc(key, self.pool.slot_bytes, None, {"fp": fp} if fp else None)
        except PoolFull:
            return False
        self._after_alloc()
        if a is None:  # someone else is filling it (a push, another load), or it became ready meanwhile
            return await self._wait_in_flight(key)
        view = self.pool.buffer[a.offset : a.offset + a.length]
        try:
            if tier == "disk":
                n = await asyncio.to_thread(self.disk.get_into, key, view, fp)  # type: ignore[union-attr]
            else:
                n = await asyncio.to_thread(self.remote.get_into, key, view, fp)  # type: ignore[union-attr]
        except (ValueError, OSError):
            n = None
        finally:
            view.release()
        if n is None:
            self.pool.abort(key)
            self.counters[tier]["misses"] += 1
            return False
        self.pool.commit(key, n)
        self.counters[tier]["hits"] += 1
        self.counters[tier]["bytes_read"] += n
        return True

    async def _wait_in_flight(self, key: bytes) -> bool:
        """Wait (at most ``inflight_wait_s``, without blocking the loop) for a chunk that is being written.

        A chunk in flight (a PD push landing, another client's load) becomes ready in milliseconds; giving up at
        once would make the caller recompute it. False when it is not in the pool, was aborted, or is still not
        ready at the deadline.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.inflight_wait_s
        while True:
            if self.pool.locate(key) is not None:
                return True
            if self.pool.meta(key) is None or loop.time() >= deadline:
                return False
            await asyncio.sleep(0.002)

    async def load(self, keys: list[bytes], conn: _Conn | None) -> list[tuple[int, int]]:
        """Bring the longest available prefix into the pool; returns locations with in-use refs taken."""
        locs: list[tuple[int, int]] = []
        fp = conn.fp if conn else None
        for k in keys:
            got = self.pool.acquire_many([k])
            if not got and self.pool.meta(k) is not None and await self._wait_in_flight(k):
                got = self.pool.acquire_many([k])
            if not got:
                ok = False
                if self.disk is not None and self.disk.contains([k]):
                    ok = await self._fill_from("disk", k, fp)
                if not ok and self.remote is not None:
                    ok = await self._fill_from("remote", k, fp)
                if ok:
                    got = self.pool.acquire_many([k])
                if not got:
                    break
            else:
                self.counters["memory"]["hits"] += 1
                self.counters["memory"]["bytes_read"] += got[0].length
            if conn is not None:
                conn.refs[k] += 1
            locs.append((got[0].offset, got[0].length))
        return locs

    def clear(self, tiers: list[str]) -> dict[str, int]:
        out = {}
        if "memory" in tiers:
            out["memory"] = self.pool.clear()
        return out

    async def clear_async(self, tiers: list[str]) -> dict[str, int]:
        out = self.clear(tiers)
        if "disk" in tiers and self.disk is not None:
            out["disk"] = await asyncio.to_thread(self.disk.clear)
        if "remote" in tiers and self.remote is not None:
            out["remote"] = await asyncio.to_thread(self.remote.clear)
        return out

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"memory": asdict(self.pool.stats()), "counters": {}}
        out["memory"]["segment"] = self.pool.segment_name
        if self.disk is not None:
            out["disk"] = asdict(self.disk.stats())
        if self.remote is not None:
            out["remote"] = {
                "name": self.remote.name,
                "up": self.remote.available,
                **asdict(self.remote.stats),
            }
        out["writeback_queue"] = self._writeback.qsize()
        out["writeback_dropped"] = self._writeback_dropped
        out["counters"] = {t: dict(c) for t, c in self.counters.items()}
        if self.transfer is not None:
            rx = self.transfer.receiver.stats()
            out["transfer"] = {
                "address": self.transfer.address,
                "push": asdict(self.transfer.stats),
                "receive": asdict(rx),
                "pushes_in_flight": len(self._pushes),
            }
        return out

    def _metrics_snapshot(self) -> dict:
        ps = self.pool.stats()
        mem = {
            "hits": ps.hits,
            "misses": ps.misses,
            "evictions": ps.evictions,
            "bytes_read": self.counters["memory"]["bytes_read"],
            "bytes_written": self.counters["memory"]["bytes_written"],
            "used_bytes": ps.used_bytes,
            "capacity_bytes": ps.capacity_bytes,
        }
        tiers = {"memory": mem}
        if self.disk is not None:
            ds = self.disk.stats()
            tiers["disk"] = {
                "hits": ds.hits,
                "misses": ds.misses,
                "evictions": ds.evictions,
                "corrupt": ds.corrupt,
                "bytes_read": self.counters["disk"]["bytes_read"],
                "bytes_written": self.counters["disk"]["bytes_written"],
                "used_bytes": ds.used_bytes,
                "capacity_bytes": ds.max_bytes,
            }
        extra = {
            "pool_pinned_chunks": ps.pinned,
            "pool_in_use_chunks": ps.in_use,
            "pool_in_flight_chunks": ps.in_flight,
        }
        if self.remote is not None:
            rs = self.remote.stats
            tiers["remote"] = {
                "hits": rs.hits,
                "misses": rs.misses,
                "bytes_read": rs.bytes_read,
                "bytes_written": rs.bytes_written,
                "corrupt": getattr(self.remote.tier, "corrupt", 0),
            }
            extra["remote_errors_total"] = rs.errors
            extra["remote_up"] = 1 if self.remote.available else 0
        if self.transfer is not None:
            ts, rx = self.transfer.stats, self.transfer.receiver.stats()
            extra.update(
                push_total=ts.pushes,
                push_failures_total=ts.failures,
                push_chunks_total=ts.chunks,
                push_bytes_total=ts.bytes,
                push_seconds_total=ts.seconds,
                received_commits_total=rx.committed,
                received_aborts_total=rx.aborted,
                receive_leases=rx.leases,
            )
        return {"tiers": tiers, "extra": extra}

    # ------------------------------------------------------------------ control socket
    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn()
        self._conns.add(writer)
        try:
            while True:
                try:
                    msg = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError, ProtocolError):
                    return
                rid = msg.get("id")
                try:
                    reply = await self._dispatch(conn, msg)
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
            self._conns.discard(writer)
            self._drop_conn(conn)
            writer.close()

    def _drop_conn(self, conn: _Conn) -> None:
        for k in conn.allocs:
            self.pool.abort(k)
        for k, n in conn.pins.items():
            self.pool.unpin([k] * n)
        for k, n in conn.refs.items():
            self.pool.release([k] * n)
        conn.allocs.clear()
        conn.pins.clear()
        conn.refs.clear()

    async def _dispatch(self, conn: _Conn, msg: dict) -> dict:
        op = msg.get("op")
        if op == "hello":
            if msg.get("proto", CONTROL_PROTO) != CONTROL_PROTO:
                raise ControlError("protocol", f"control protocol {msg.get('proto')} != {CONTROL_PROTO}")
            if not token_matches(msg.get("token"), self.token):
                raise ControlError("unauthorized", "bad cluster token")
            conn.authed = True
            fp = msg.get("fingerprint")
            if fp:
                try:
                    mf = ModelFingerprint.from_dict(fp)
                except TypeError as e:
                    raise ControlError("bad_request", f"fingerprint: {e}") from e
                conn.fp = mf.digest()
                if self.fingerprint is None:
                    self.fingerprint = mf
            return {
                "proto": CONTROL_PROTO,
                "segment": self.pool.segment_name,
                "pool_bytes": self.pool.capacity_bytes,
                "slot_bytes": self.pool.slot_bytes,
                "num_slots": self.pool.num_slots,
                "chunk_tokens": self.config.chunk_tokens,
            }
        if not conn.authed:
            raise ControlError("unauthorized", "send hello with the cluster token first")
        if op == "lookup":
            n, tiers = await self.lookup(_keys(msg), bool(msg.get("remote", True)))
            return {"n": n, "tiers": tiers}
        if op == "load":
            locs = await self.load(_keys(msg), conn)
            return {"n": len(locs), "locs": [list(x) for x in locs]}
        if op == "alloc":
            return self._alloc(conn, _keys(msg), msg.get("nbytes"), msg.get("lease_s"))
        if op == "commit":
            keys = _keys(msg)
            n = 0
            done = []
            for k in keys:
                if self.pool.commit(k):
                    n += 1
                    done.append(k)
                conn.allocs.discard(k)
            for k in done:
                loc = self.pool.locate(k)
                if loc is not None:
                    self.counters["memory"]["bytes_written"] += loc.length
            self._schedule_writeback(done)
            return {"n": n}
        if op == "abort":
            keys = _keys(msg)
            n = sum(1 for k in keys if self.pool.abort(k))
            conn.allocs.difference_update(keys)
            return {"n": n}
        if op == "pin":
            keys = _keys(msg)
            n = 0
            for k in keys:
                if self.pool.pin([k]):
                    conn.pins[k] += 1
                    n += 1
            return {"n": n}
        if op in ("unpin", "release"):
            held = conn.pins if op == "unpin" else conn.refs
            fn = self.pool.unpin if op == "unpin" else self.pool.release
            n = 0
            for k in _keys(msg):
                if held[k] > 0 and fn([k]):
                    held[k] -= 1
                    n += 1
                if held[k] <= 0:
                    del held[k]
            return {"n": n}
        if op == "push":
            return self._start_push(msg)
        if op == "stats":
            return {"stats": self.stats()}
        if op == "clear":
            return {"cleared": await self.clear_async(list(msg.get("tiers") or ["memory"]))}
        raise ControlError("bad_request", f"unknown op {op!r}")

    def _start_push(self, msg: dict) -> dict:
        """Queue a push of ready chunks to a peer's receiver; answers at once (the push runs in a thread)."""
        if self.transfer is None:
            raise ControlError("unavailable", "this tier server has no transfer endpoint (transfer.enabled)")
        keys, peer, tid = _keys(msg), msg.get("peer"), msg.get("transfer_id")
        deadline_s = msg.get("deadline_s", 10.0)
        if not isinstance(peer, str) or not isinstance(tid, str) or not isinstance(deadline_s, (int, float)):
            raise ControlError("bad_request", "push needs peer (host:port), transfer_id and deadline_s")
        try:
            parse_address(peer)
        except ValueError as e:
            raise ControlError("bad_request", str(e)) from None
        task = asyncio.create_task(self._push(keys, peer, tid, float(deadline_s)), name=f"push-{tid}")
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)
        return {"queued": len(keys)}

    async def _push(self, keys: list[bytes], peer: str, tid: str, deadline_s: float) -> None:
        assert self.transfer is not None
        try:
            result = await asyncio.to_thread(self.transfer.push, keys, peer, tid, deadline_s)
        except TransferError as e:
            log.warning("push %s to %s failed: %s (%s, retryable=%s)", tid, peer, e, e.code, e.retryable)
            return
        if result is not None:
            log.debug(
                "push %s to %s: %d written, %d skipped", tid, peer, len(result.written), len(result.skipped)
            )

    def _alloc(self, conn: _Conn, keys: list[bytes], nbytes: Any, lease_s: Any) -> dict:
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
                a = self.pool.alloc(k, size, lease_s, meta)
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
        self._after_alloc()
        return {"locs": locs, "full": full}

    # ------------------------------------------------------------------ HTTP
    def _make_app(self):
        app = FastAPI(title="pdmesh tier server", docs_url=None, redoc_url=None)

        def auth(request: Request) -> None:
            if not token_matches(request.headers.get(TOKEN_HEADER), self.token):
                raise HTTPException(401, "missing or bad cluster token")

        @app.get("/health")
        async def health() -> dict:
            return {
                "status": "ok",
                "segment": self.pool.segment_name,
                "remote_up": None if self.remote is None else self.remote.available,
            }

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(render(self.registry), media_type="text/plain; version=0.0.4")

        @app.get("/stats", dependencies=[Depends(auth)])
        async def stats() -> dict:
            return self.stats()

        @app.post("/lookup", dependencies=[Depends(auth)])
        async def lookup(body: dict) -> dict:
            chunk_tokens = int(body.get("chunk_tokens") or self.config.chunk_tokens)
            try:
                if "keys" in body:
                    keys = [key_from_hex(k) for k in body["keys"]]
                elif "token_ids" in body:
                    fp = body.get("fingerprint")
                    if fp is not None:
                        seed = ModelFingerprint.from_dict(fp).digest()
                    elif self.fingerprint is not None:
                        seed = self.fingerprint.digest()
                    else:
                        raise HTTPException(
                            422, "no fingerprint: pass one or configure the tier's fingerprint"
                        )
                    keys = chain_keys(seed, body["token_ids"], chunk_tokens)
                else:
                    raise HTTPException(422, "body needs 'keys' (hex) or 'token_ids'")
            except (ValueError, TypeError) as e:
                raise HTTPException(422, str(e)) from e
            n, tiers = await self.lookup(keys, bool(body.get("remote", True)))
            return {"chunks": n, "tokens": n * chunk_tokens, "total_chunks": len(keys), "tiers": tiers}

        @app.post("/clear", dependencies=[Depends(auth)])
        async def clear(body: dict | None = None) -> dict:
            tiers = (body or {}).get("tiers") or ["memory", "disk"]
            return {"cleared": await self.clear_async(list(tiers))}

        return app


async def _amain(config: TierConfig) -> None:
    server = TierServer(config)
    try:
        await server.start()
    except BaseException:
        await server.close()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.close()))
    print(READY_PREFIX + json.dumps(server.ready_info()), flush=True)
    log.info("tier server ready: %s", server.ready_info())
    await server.wait_closed()


def run_tier_server(config: TierConfig) -> None:
    """Run a tier server in the foreground until SIGINT/SIGTERM. Prints one ``PDMESH_TIER_READY {json}`` line
    (socket, http, segment, pid) on stdout once serving."""
    asyncio.run(_amain(config))
