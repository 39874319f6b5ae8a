"""The tier core: one node's KV chunks in memory (the shared-memory pool), on local disk and in the remote
tier, plus the node's transfer endpoint. :class:`pdmesh.kvcache.server.TierServer` puts listeners in front of it
(the control socket, :mod:`pdmesh.kvcache.control_ops`; the HTTP API, :mod:`pdmesh.kvcache.tier_http`).

Runs on one asyncio loop. Blocking work (disk and remote I/O, pushes) runs in threads (``asyncio.to_thread``);
remote calls are bounded by the remote's timeouts and a circuit breaker, so a dead remote makes lookups miss
quickly. Committed chunks are written through to disk/remote in the background (a bounded queue: when it is
full, write-backs are dropped and counted, never waited for).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import asdict
from typing import Any

import pdmesh.failpoints as failpoints
from pdmesh.kvcache.config import TierConfig
from pdmesh.kvcache.disk import DiskTier
from pdmesh.kvcache.keys import ModelFingerprint
from pdmesh.kvcache.metrics import make_registry
from pdmesh.kvcache.pool import ChunkPool, PoolFull
from pdmesh.kvcache.remote import GuardedRemote, open_remote, remote_breaker
from pdmesh.kvcache.transfer_node import TransferNode
from pdmesh.transfer.errors import TransferError
from pdmesh.transfer.segment import sweep_stale_segments

log = logging.getLogger("pdmesh.tier")


class Tier:
    """Owns the pool, disk and remote tiers and the transfer endpoint (``start_transfer``/``close_core``)."""

    def __init__(self, config: TierConfig) -> None:
        self.config = config
        self.token = config.resolved_token()
        sweep_stale_segments()  # pools of tier servers that were SIGKILLed
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
                    r.url,
                    self.token,
                    timeout_s=r.timeout_s,
                    connect_timeout_s=r.connect_timeout_s,
                    ttl_s=r.ttl_s,
                )
                self.remote = GuardedRemote(tier, remote_breaker(r.breaker_failures, r.breaker_cooldown_s))
        except BaseException:
            self.pool.close()
            raise
        self.transfer: TransferNode | None = None
        self._pushes: set[asyncio.Task] = set()
        self.fingerprint: ModelFingerprint | None = (
            ModelFingerprint.from_dict(config.fingerprint) if config.fingerprint else None
        )
        # the chunk size of the engine this tier serves (told at its connector's hello); /lookup by token ids
        # uses it, so the router's lookups chunk as the engine keys (the tier's own config may differ)
        self.engine_chunk_tokens: int | None = None
        self.counters: dict[str, Counter] = {t: Counter() for t in ("memory", "disk", "remote")}
        self.registry = make_registry(self._metrics_snapshot)
        self._tasks: list[asyncio.Task] = []
        self._writeback: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1024)
        self._spill_event = asyncio.Event()
        self._writeback_dropped = 0

    def engine_id(self) -> str:
        """The digest (hex) of the engine fingerprint this tier's chunks belong to; ``""`` until the engine's
        connector says hello (or the config names it)."""
        return self.fingerprint.digest().hex() if self.fingerprint is not None else ""

    async def start_core(self) -> None:
        """Start the transfer endpoint (if configured) and the background tasks."""
        if self.config.transfer.enabled:
            t = self.config.transfer
            self.transfer = TransferNode(
                self.pool,
                t.fingerprint,
                self.token,
                t.host,
                t.port,
                t.advertise_host,
                t.backends,
                self.engine_id,
            )
            await asyncio.to_thread(self.transfer.start)
        self._tasks += [
            asyncio.create_task(self._reaper(), name="tier-reaper"),
            asyncio.create_task(self._writeback_loop(), name="tier-writeback"),
            asyncio.create_task(self._spill_loop(), name="tier-spill"),
        ]

    async def close_core(self) -> None:
        """Cancel background tasks and pushes, stop the transfer endpoint, close the remote and the pool."""
        for t in self._tasks:
            if t.get_name() != "tier-http":
                t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for t in list(self._pushes):
            t.cancel()
        if self.transfer is not None:
            await asyncio.to_thread(self.transfer.close)
        if self.remote is not None:
            await asyncio.to_thread(self.remote.close)
        self.pool.close()

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

    def after_alloc(self) -> None:
        if self.pool._spill:
            self._spill_event.set()

    def schedule_writeback(self, keys: list[bytes]) -> None:
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
        """Allocate a slot for ``key`` and read it from disk/remote straight into it. True when ready.

        Whatever happens after the slot is allocated (a miss, any error of the reader, a failpoint, the caller's
        cancellation) the slot is committed or aborted before this returns or raises: no key stays allocated for
        later requests to wait on. On cancellation the read thread is first waited for (bounded by the tier's own
        timeouts), since it writes into the slot."""
        try:
            a = self.pool.alloc(key, self.pool.slot_bytes, None, {"fp": fp} if fp else None)
        except PoolFull:
            return False
        self.after_alloc()
        if a is None:  # someone else is filling it (a push, another load), or it became ready meanwhile
            return await self._wait_in_flight(key)
        view = self.pool.buffer[a.offset : a.offset + a.length]
        n: int | None = None
        read: asyncio.Future | None = None
        try:
            failpoints.hit("kvcache.tier.load")
            reader = self.disk.get_into if tier == "disk" else self.remote.get_into  # type: ignore[union-attr]
            read = asyncio.ensure_future(asyncio.to_thread(reader, key, view, fp))
            n = await asyncio.shield(read)
        except asyncio.CancelledError:
            try:
                if read is not None:
                    # the thread writes into the slot: never free it under the writer (a second cancellation
                    # during this wait only shortens it: the slot is aborted in any case)
                    await asyncio.wait({read})
            finally:
                view.release()
                self.pool.abort(key)
            raise
        except Exception as e:  # any reader failure is a miss; the slot goes back
            if not isinstance(e, (ValueError, OSError)):
                log.warning("%s tier fill of %s failed: %r", tier, key.hex()[:16], e)
            n = None
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

    async def load(
        self, keys: list[bytes], fp: bytes | None = None, refs: Counter | None = None
    ) -> list[tuple[int, int]]:
        """Bring the longest available prefix into the pool; returns locations with in-use refs taken (one per
        returned key: the caller owns them and must ``pool.release`` each). Each ref is recorded in ``refs`` the
        moment it is taken, so a load cut short (an error, a cancellation) leaves no ref its owner cannot see."""
        locs: list[tuple[int, int]] = []
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
            if refs is not None:
                refs[k] += 1
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
                "writable": self.remote.writable,
                **asdict(self.remote.stats),
                "corrupt": self.remote.corrupt,
                "mac_failures": self.remote.mac_failures,
            }
        out["writeback_queue"] = self._writeback.qsize()
        out["writeback_dropped"] = self._writeback_dropped
        out["counters"] = {t: dict(c) for t, c in self.counters.items()}
        if self.transfer is not None:
            rx = self.transfer.receiver.stats()
            out["transfer"] = {
                "address": self.transfer.address,
                "backends": self.transfer.backends,  # offered to senders, in preference order
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
        if self.disk is not None:
            extra["disk_full_total"] = ds.disk_full
        if self.remote is not None:
            rs = self.remote.stats
            tiers["remote"] = {
                "hits": rs.hits,
                "misses": rs.misses,
                "bytes_read": rs.bytes_read,
                "bytes_written": rs.bytes_written,
                "corrupt": self.remote.corrupt,
            }
            extra["remote_errors_total"] = rs.errors
            extra["remote_mac_failures_total"] = self.remote.mac_failures
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
            return {"tiers": tiers, "extra": extra, "push_by_backend": dict(ts.by_backend)}
        return {"tiers": tiers, "extra": extra}

    def start_push(self, keys: list[bytes], peer: str, tid: str, deadline_s: float) -> None:
        """Queue a push of ready chunks to a peer's receiver (runs in a thread; its outcome is logged and counted
        in the transfer stats). The caller has validated the arguments."""
        task = asyncio.create_task(self._push(keys, peer, tid, deadline_s), name=f"push-{tid}")
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

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
