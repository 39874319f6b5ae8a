"""Receiver: the transfer endpoint inside a decode node's tier server.

Serves the control protocol (:mod:`pdmesh.transfer.protocol`) on ``(host, port)`` with one thread per
connection, at most ``max_connections`` at once (more are closed at accept), allocates regions from a :class:`RegionProvider` under leases, commits and aborts them, and reaps expired leases.

Lease rules: :mod:`pdmesh.transfer.leases` (a region is reused only after grace, never while a TCP write into
it runs, and for one-sided backends only once its writer showed it stopped, or after ``one_sided_hold_s``). The
reaper thread runs every ``reap_interval_s`` and also calls ``provider.reclaim_expired``.

Peers are authenticated both ways before any ALLOC (:mod:`pdmesh.transfer.peer_auth`): an unauthenticated
connection costs at most two frames of ``PRE_AUTH_MAX_FRAME`` bytes and ``HELLO_TIMEOUT_S`` seconds. Numbers from
the wire are checked (a non-finite ``lease_ms`` is refused).

Threads: accept loop, one per control connection, the reaper, and a notification poller (backs off to 20 ms
when idle; it also progresses NIXL/UCX). Provider calls happen under one lock. The accept loop survives errors
(e.g. no thread can be started: that connection is closed and counted in ``refused``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pdmesh.failpoints as failpoints
from pdmesh.security import require_token_for_bind
from pdmesh.transfer.backend import TransferBackend, register_into
from pdmesh.transfer.errors import IncompatiblePeer, PeerUnavailable, TransferError, TransferFailed
from pdmesh.transfer.leases import FORCED, Lease, sees_writes
from pdmesh.transfer.peer_auth import server_handshake
from pdmesh.transfer.protocol import PROTOCOL_VERSION, engines_differ, no_engine, recv_frame, send_frame
from pdmesh.transfer.provider import RegionProvider

ACTIVE_POLL_S = 500e-6  # notification/progress poll interval while a transfer is in flight
log = logging.getLogger(__name__)


@dataclass
class ReceiverConfig:
    """``fingerprint``: the transfer format both sides must share. ``engine``: the digest of the model fingerprint
    of the engine whose chunks this node holds (model, dtype, KV layout and geometry; ``""`` while unknown), read
    at each handshake: a peer whose own engine digest is known and differs is refused, since its chunks would
    unpack into another layout."""

    fingerprint: str
    engine: Callable[[], str] = no_engine
    host: str = "127.0.0.1"
    port: int = 0
    token: str = ""
    max_lease_s: float = 60.0
    grace_s: float = 2.0
    reap_interval_s: float = 0.2
    idle_timeout_s: float = 600.0
    io_timeout_s: float = 30.0
    committed_memory: int = 4096  # transfer ids remembered for idempotent COMMIT
    max_connections: int = 256  # control connections at once (each is a thread); more are closed at accept
    one_sided_hold_s: float = 60.0  # an expired one-sided lease's wait for its writer to stop (leases)


@dataclass(frozen=True)
class ReceiverStats:
    leases: int
    leased_keys: int
    committed: int
    aborted: int
    reaped: int
    notifs: int
    refused: int = 0  # connections closed at accept (cap reached, no thread) or failed authentication
    forced: int = 0  # one-sided leases freed at one_sided_hold_s, their writer never seen to stop
    held: int = 0  # expired one-sided leases kept now, waiting for their writer to show it stopped


class Receiver:
    """Start with :meth:`start` (returns the bound address), stop with :meth:`close`. ``backends`` have not
    been registered yet: the receiver registers the provider's buffer with each."""

    def __init__(
        self, provider: RegionProvider, config: ReceiverConfig, backends: Sequence[TransferBackend]
    ) -> None:
        require_token_for_bind(config.host, config.token, "pdmesh transfer receiver")
        self.provider = provider
        self.config = config
        self.backends = {b.name: b for b in backends}
        self._progressed = any(b.needs_progress for b in backends)
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._committed: OrderedDict[str, int] = OrderedDict()
        self._counts = {"committed": 0, "aborted": 0, "reaped": 0, "notifs": 0, "refused": 0, "forced": 0}
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._conns: dict[int, socket.socket] = {}
        self._one_sided: set[int] = set()  # connections offered a one-sided backend
        self._next_conn = 0
        self._threads: list[threading.Thread] = []
        self._metadata: dict[str, bytes] = {}
        self.address: tuple[str, int] | None = None

    # lifecycle
    def start(self) -> tuple[str, int]:
        """Register the provider's memory with each backend and start serving. A provider with a
        ``memory_region`` (a device staging region) is registered as that region where a backend takes it;
        a backend that cannot reach the memory (TCP, shm and device memory) is not offered."""
        region = getattr(self.provider, "memory_region", None)
        for b in self.backends.values():
            if not register_into(b, self.provider.buffer, self.provider.segment_name, region):
                log.info(
                    "backend %s not offered: it cannot reach %s memory", b.name, region and region.mem_type
                )
                continue
            b.set_write_guard(self)
            try:
                self._metadata[b.name] = b.local_metadata()
            except TransferError as exc:
                log.info("backend %s not offered: %s", b.name, exc)
        self._listener = socket.create_server((self.config.host, self.config.port), backlog=128)
        self.address = (self.config.host, self._listener.getsockname()[1])
        for target, name in (
            (self._accept_loop, "accept"),
            (self._reap_loop, "reaper"),
            (self._notif_loop, "notifs"),
        ):
            t = threading.Thread(target=target, name=f"pdmesh-rx-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self.address

    def close(self) -> None:
        """Stop serving; backends are closed. Leases still held are left to the provider's owner."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # unblocks accept() in the accept thread
            self._listener.close()
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        for t in self._threads:
            t.join(timeout=5)
        for b in self.backends.values():
            b.close()

    def stats(self) -> ReceiverStats:
        now = time.monotonic()
        with self._lock:
            return ReceiverStats(
                leases=len(self._leases),
                leased_keys=sum(len(x.keys) for x in self._leases.values()),
                held=sum(1 for x in self._leases.values() if x.waits_for_writer(now, self.config.grace_s)),
                **self._counts,
            )

    # WriteGuard (TCP backend)
    def begin_write(self, notif: bytes, segments: Sequence[tuple[int, int]]) -> float | None:
        tid = notif.decode(errors="replace")
        now = time.monotonic()
        with self._lock:
            lease = self._leases.get(tid)
            if lease is None or lease.cut or lease.deadline <= now:
                return None
            allowed = lease.regions
            for off, n in segments:
                if not any(ro <= off and off + n <= ro + rn for ro, rn in allowed):
                    return None
            lease.writers += 1
            return lease.deadline

    def end_write(self, notif: bytes, ok: bool) -> None:
        with self._lock:
            lease = self._leases.get(notif.decode(errors="replace"))
            if lease is not None:
                lease.writers -= 1

    # control protocol
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError as exc:
                if self._stop.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    return  # closed
                log.warning("transfer receiver: accept failed (%s); still serving", exc)
                time.sleep(0.05)  # e.g. EMFILE: let connections close
                continue
            with self._lock:
                full = len(self._conns) >= self.config.max_connections
                if not full:
                    cid = self._next_conn
                    self._next_conn += 1
                    self._conns[cid] = conn
            if full:
                self._refuse(conn, "connection cap reached")
                continue
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(
                    target=self._serve, args=(conn, cid), name="pdmesh-rx-conn", daemon=True
                ).start()
            except (OSError, RuntimeError) as exc:  # RuntimeError: can't start new thread
                with self._lock:
                    self._conns.pop(cid, None)
                self._refuse(conn, f"cannot serve it: {exc}")

    def _refuse(self, conn: socket.socket, why: str) -> None:
        with self._lock:
            self._counts["refused"] += 1
            n = self._counts["refused"]
        if n == 1 or n % 1000 == 0:
            log.warning("transfer receiver: closed a connection (%s; %d so far)", why, n)
        conn.close()

    def _serve(self, conn: socket.socket, cid: int) -> None:
        cfg = self.config
        peer_closed = False
        try:
            try:
                hello = server_handshake(conn, cfg.token, self._check_hello)
            except TransferError:
                with self._lock:
                    self._counts["refused"] += 1
                raise
            if any(not sees_writes(self.backends[b]) for b in self._wanted(hello)):
                with self._lock:
                    self._one_sided.add(cid)
            send_frame(conn, self._hello_ok(hello), time.monotonic() + cfg.io_timeout_s)
            while not self._stop.is_set():
                try:
                    msg = recv_frame(conn, time.monotonic() + cfg.idle_timeout_s)
                except PeerUnavailable:  # EOF or reset from the peer (not our idle timeout: TransferTimeout)
                    peer_closed = not self._stop.is_set()
                    raise
                try:
                    reply = self._handle(msg, cid)
                except TransferError as exc:
                    reply = exc.to_wire()
                except (KeyError, TypeError, ValueError) as exc:
                    reply = TransferFailed(f"bad {msg.get('op')} request: {exc}").to_wire()
                send_frame(conn, reply, time.monotonic() + cfg.io_timeout_s)
        except TransferError as exc:
            with contextlib.suppress(TransferError, OSError):
                send_frame(conn, exc.to_wire(), time.monotonic() + 1.0)
        finally:
            conn.close()
            self._connection_lost(cid, peer_closed)

    def _check_hello(self, msg: dict) -> None:
        """Refuse before authentication; the reply says why in general terms only (the peer is not trusted with
        this node's fingerprint or backends), the log has the detail."""
        if msg.get("op") != "hello" or msg.get("v") != PROTOCOL_VERSION:
            raise IncompatiblePeer(f"expected hello v{PROTOCOL_VERSION}")
        if msg.get("fingerprint") != self.config.fingerprint:
            log.warning("transfer peer refused: fingerprint %.200r != ours", msg.get("fingerprint"))
            raise IncompatiblePeer("fingerprint mismatch")
        if engines_differ(self.config.engine(), msg.get("engine")):
            log.warning(
                "transfer peer refused: engine %.200r != ours %s", msg.get("engine"), self.config.engine()
            )
            raise IncompatiblePeer("engine fingerprint mismatch (another model, dtype or KV layout)")
        if not self._wanted(msg):
            log.warning("transfer peer refused: no common backend in %.200r", msg.get("backends"))
            raise IncompatiblePeer("no common backend")

    def _wanted(self, msg: dict) -> list[str]:
        backends = msg.get("backends")
        if not isinstance(backends, list):
            return []
        return [b for b in backends if isinstance(b, str) and b in self._metadata]

    def _hello_ok(self, msg: dict) -> dict:
        """Sent only to an authenticated peer: the backends' metadata (segment names, data ports)."""
        return {
            "op": "hello_ok",
            "v": PROTOCOL_VERSION,
            "fingerprint": self.config.fingerprint,
            "engine": self.config.engine(),
            "metadata": {b: self._metadata[b] for b in self._wanted(msg)},
        }

    def _handle(self, msg: dict, cid: int) -> dict:
        op = msg.get("op")
        if op == "alloc":
            lease_ms = msg["lease_ms"]
            if (
                isinstance(lease_ms, bool)
                or not isinstance(lease_ms, (int, float))
                or not math.isfinite(lease_ms)
            ):
                raise TransferFailed(f"lease_ms must be a finite number, not {lease_ms!r}")
            return self._alloc(str(msg["transfer_id"]), msg["keys"], msg["sizes"], float(lease_ms), cid)
        if op == "commit":
            return self._commit(str(msg["transfer_id"]))
        if op == "abort":
            self._cut(str(msg["transfer_id"]), count_abort=True, stopped_by=cid)
            return {"op": "abort_ok"}
        raise TransferFailed(f"unknown op {op!r}")

    def _alloc(self, tid: str, keys: list, sizes: list, lease_ms: float, cid: int) -> dict:
        failpoints.hit("transfer.receiver.alloc")
        if not isinstance(keys, list) or not isinstance(sizes, list) or len(keys) != len(sizes):
            raise TransferFailed("keys and sizes must be lists of the same length")
        if not all(isinstance(k, bytes) for k in keys) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
        ):
            raise TransferFailed("keys must be bytes and sizes positive integers")
        lease_s = min(max(lease_ms, 0.0) / 1000.0, self.config.max_lease_s)
        now = time.monotonic()
        with self._lock:
            if tid in self._committed:
                raise TransferFailed(f"transfer {tid} already committed")
            lease = self._leases.get(tid)  # a later ALLOC of the same transfer keeps the first deadline
            if lease is None:
                cfg = self.config
                lease = Lease.new(
                    tid, cid, now + lease_s, cid in self._one_sided, cfg.grace_s, cfg.one_sided_hold_s
                )
                self._leases[tid] = lease
            elif lease.cut or lease.conn_id != cid:
                raise TransferFailed(f"transfer {tid} was aborted or belongs to another connection")
            provider_deadline = lease.provider_deadline(self.config.grace_s)
            offsets: list[int | None] = []
            new: list[bytes] = []
            try:
                for key, size in zip(keys, sizes, strict=True):
                    off = self.provider.alloc(bytes(key), int(size), provider_deadline)
                    offsets.append(off)
                    if off is not None:
                        new.append(bytes(key))
                        lease.regions.append((off, int(size)))
            except Exception:
                for k in new:  # nothing was written into them yet: safe to free at once
                    self.provider.abort(k)
                del lease.regions[len(lease.regions) - len(new) :]
                if not lease.keys:
                    del self._leases[tid]
                raise
            lease.keys.extend(new)
        return {"op": "alloc_ok", "offsets": offsets, "lease_ms": lease_s * 1000.0}

    def _commit(self, tid: str) -> dict:
        now = time.monotonic()
        with self._lock:
            if tid in self._committed:
                return {"op": "commit_ok", "committed": self._committed[tid]}
            lease = self._leases.get(tid)
            if lease is None:
                raise TransferFailed(f"unknown transfer {tid} (lease expired?)", retryable=True)
            if lease.cut or lease.deadline < now:
                raise TransferFailed(f"transfer {tid}: lease expired or aborted", retryable=True)
            if lease.writers:
                raise TransferFailed(f"transfer {tid}: a write is still in progress")
            for k in lease.keys:
                self.provider.commit(k)
            del self._leases[tid]
            self._committed[tid] = len(lease.keys)
            while len(self._committed) > self.config.committed_memory:
                self._committed.popitem(last=False)
            self._counts["committed"] += 1
            return {"op": "commit_ok", "committed": len(lease.keys)}

    def _cut(self, tid: str, count_abort: bool, stopped_by: int | None = None) -> None:
        """No more writes or COMMIT for ``tid``. ``stopped_by``: the connection that showed its writer stopped
        (it counts only when that is the lease's own connection)."""
        now = time.monotonic()
        with self._lock:
            lease = self._leases.get(tid)
            if lease is None:
                return
            if not lease.cut:
                lease.cut = True
                lease.deadline = min(lease.deadline, now)
                if count_abort:
                    self._counts["aborted"] += 1
            if stopped_by == lease.conn_id and lease.stopped is None:
                lease.stopped = now

    def _connection_lost(self, cid: int, peer_closed: bool) -> None:
        with self._lock:
            self._conns.pop(cid, None)
            self._one_sided.discard(cid)
            tids = [t for t, x in self._leases.items() if x.conn_id == cid]
        for t in tids:
            self._cut(t, count_abort=False, stopped_by=cid if peer_closed else None)

    # background loops
    def _reap_loop(self) -> None:
        while not self._stop.wait(self.config.reap_interval_s):
            self.reap(time.monotonic())

    def reap(self, now: float) -> int:
        """Free the leases that :meth:`Lease.due` allows at ``now`` (past deadline + grace, no TCP write running,
        a one-sided one's writer shown stopped or its hold over). Returns the number of regions freed."""
        freed = 0
        with self._lock:
            for tid, lease in list(self._leases.items()):
                due = lease.due(now, self.config.grace_s)
                if due is not None:
                    if due == FORCED:
                        self._counts["forced"] += 1
                        log.warning(
                            "transfer %s: freeing %d regions after %.0f s without a sign that its one-sided "
                            "writer stopped; a writer stalled even longer could still write into them",
                            tid,
                            len(lease.keys),
                            self.config.one_sided_hold_s,
                        )
                    for k in lease.keys:
                        self.provider.abort(k)
                    freed += len(lease.keys)
                    del self._leases[tid]
                    self._counts["reaped"] += 1
            freed += self.provider.reclaim_expired(now)
        return freed

    def _notif_loop(self) -> None:
        """Drain the one-sided backends' notifications, which also progresses them: UCX moves the bytes of a WRITE
        over its TCP transport only when the target's worker is progressed, so while a lease is open (a transfer
        between ALLOC and COMMIT) this polls every ``ACTIVE_POLL_S``; idle, it backs off to 20 ms."""
        delay = 1e-3
        while not self._stop.wait(delay):
            n = 0
            for b in self.backends.values():
                try:
                    n += len(b.get_notifs())
                except Exception:
                    log.exception("notification poll failed on %s", b.name)
            if n:
                with self._lock:
                    self._counts["notifs"] += n
                delay = 1e-3
            else:
                delay = min(delay * 2, 20e-3)
            if self._progressed and self._leases:  # a transfer is in flight (read without the lock: a hint)
                delay = min(delay, ACTIVE_POLL_S)
