"""Receiver: the transfer endpoint inside a decode node's tier server.

Serves the control protocol (:mod:`pdmesh.transfer.protocol`) on ``(host, port)`` with one thread per
connection, at most ``max_connections`` at once (more are closed at accept), allocates regions from a :class:`RegionProvider` under leases, commits and aborts them, and reaps expired leases.

Lease rules (design.md, "Leases and failure rules"):

* ALLOC gives every region a lease ending at ``now + lease_ms`` (capped by ``max_lease_s``); the provider is told
  ``lease deadline + grace``.
* COMMIT (idempotent) before the lease ends makes the chunks ready; after it, the region belongs to the tier.
* ABORT, a closed control connection, or an expired lease never free a region at once: the lease is cut to
  ``now`` and the reaper frees it only after ``grace_s``, and never while a TCP write into it is still running
  (that write is itself bounded by the lease deadline). So a late write cannot land in reused memory.
* The reaper thread runs every ``reap_interval_s`` and also calls ``provider.reclaim_expired``.

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
from collections.abc import Sequence
from dataclasses import dataclass, field

import pdmesh.failpoints as failpoints
from pdmesh.security import require_token_for_bind
from pdmesh.transfer.backend import TransferBackend, register_into
from pdmesh.transfer.errors import IncompatiblePeer, TransferError, TransferFailed
from pdmesh.transfer.peer_auth import server_handshake
from pdmesh.transfer.protocol import PROTOCOL_VERSION, recv_frame, send_frame
from pdmesh.transfer.provider import RegionProvider

ACTIVE_POLL_S = 500e-6  # notification/progress poll interval while a transfer is in flight
log = logging.getLogger(__name__)


@dataclass
class ReceiverConfig:
    fingerprint: str
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


@dataclass
class _Lease:
    transfer_id: str
    conn_id: int
    deadline: float
    keys: list[bytes] = field(default_factory=list)
    regions: list[tuple[int, int]] = field(default_factory=list)
    writers: int = 0
    cut: bool = False  # aborted / connection lost: free after grace, never commit


@dataclass(frozen=True)
class ReceiverStats:
    leases: int
    leased_keys: int
    committed: int
    aborted: int
    reaped: int
    notifs: int
    refused: int = 0  # connections closed at accept (cap reached, no thread) or failed authentication


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
        self._leases: dict[str, _Lease] = {}
        self._committed: OrderedDict[str, int] = OrderedDict()
        self._counts = {"committed": 0, "aborted": 0, "reaped": 0, "notifs": 0, "refused": 0}
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._conns: dict[int, socket.socket] = {}
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
        with self._lock:
            return ReceiverStats(
                leases=len(self._leases),
                leased_keys=sum(len(x.keys) for x in self._leases.values()),
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
        try:
            try:
                hello = server_handshake(conn, cfg.token, self._check_hello)
            except TransferError:
                with self._lock:
                    self._counts["refused"] += 1
                raise
            send_frame(conn, self._hello_ok(hello), time.monotonic() + cfg.io_timeout_s)
            while not self._stop.is_set():
                msg = recv_frame(conn, time.monotonic() + cfg.idle_timeout_s)
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
            self._connection_lost(cid)

    def _check_hello(self, msg: dict) -> None:
        """Refuse before authentication; the reply says why in general terms only (the peer is not trusted with
        this node's fingerprint or backends), the log has the detail."""
        if msg.get("op") != "hello" or msg.get("v") != PROTOCOL_VERSION:
            raise IncompatiblePeer(f"expected hello v{PROTOCOL_VERSION}")
        if msg.get("fingerprint") != self.config.fingerprint:
            log.warning("transfer peer refused: fingerprint %.200r != ours", msg.get("fingerprint"))
            raise IncompatiblePeer("fingerprint mismatch")
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
            self._cut(str(msg["transfer_id"]), count_abort=True)
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
                lease = _Lease(tid, cid, now + lease_s)
                self._leases[tid] = lease
            elif lease.cut or lease.conn_id != cid:
                raise TransferFailed(f"transfer {tid} was aborted or belongs to another connection")
            provider_deadline = lease.deadline + self.config.grace_s
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

    def _cut(self, tid: str, count_abort: bool) -> None:
        with self._lock:
            lease = self._leases.get(tid)
            if lease is not None and not lease.cut:
                lease.cut = True
                lease.deadline = min(lease.deadline, time.monotonic())
                if count_abort:
                    self._counts["aborted"] += 1

    def _connection_lost(self, cid: int) -> None:
        with self._lock:
            self._conns.pop(cid, None)
            tids = [t for t, x in self._leases.items() if x.conn_id == cid]
        for t in tids:
            self._cut(t, count_abort=False)

    # background loops
    def _reap_loop(self) -> None:
        while not self._stop.wait(self.config.reap_interval_s):
            self.reap(time.monotonic())

    def reap(self, now: float) -> int:
        """Free leases past deadline + grace with no write running. Returns the number of regions freed."""
        freed = 0
        with self._lock:
            for tid, lease in list(self._leases.items()):
                if lease.writers == 0 and now > lease.deadline + self.config.grace_s:
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
