"""Sender: pushes chunks from this node's pool into a peer tier (ALLOC -> WRITE -> COMMIT).

``Sender.push`` blocks the calling thread until the chunks are committed on the peer or a typed
:class:`TransferError` is raised, always by ``deadline`` (time.monotonic) plus at most one best-effort ABORT of
``abort_timeout_s``. Call it from a worker thread in asyncio code (``await asyncio.to_thread(sender.push, ...)``).
Concurrent pushes are fine: each takes its own pooled control connection (+ backend connection).

Backend choice: the first of ``SenderConfig.backends`` that the peer offers and that connects (``shm`` only
succeeds on the same host, so the default order ``shm, nixl, tcp`` picks the cheapest path that works).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pdmesh.failpoints as failpoints
from pdmesh.transfer.backend import MemoryRegion, Segment, TransferBackend, register_into
from pdmesh.transfer.errors import IncompatiblePeer, PeerUnavailable, TransferError, TransferTimeout
from pdmesh.transfer.peer_auth import client_handshake
from pdmesh.transfer.protocol import PROTOCOL_VERSION, connect, engines_differ, no_engine, request

Address = tuple[str, int]
log = logging.getLogger("pdmesh.transfer")


class _StaleConnection(PeerUnavailable):
    """The peer was unreachable before ALLOC succeeded (a pooled connection may just be stale)."""


@dataclass(frozen=True)
class Chunk:
    """A chunk to push: its key and where its bytes are in the sender's buffer."""

    key: bytes
    local_offset: int
    nbytes: int


@dataclass(frozen=True)
class PushResult:
    backend: str
    written: list[bytes]  # keys whose bytes were written and committed
    skipped: list[bytes]  # keys the peer already had (or had in flight)
    nbytes: int


@dataclass
class SenderConfig:
    """``engine``: as :class:`pdmesh.transfer.receiver.ReceiverConfig`'s: a peer whose engine differs is refused."""

    fingerprint: str
    engine: Callable[[], str] = no_engine
    token: str = ""
    backends: tuple[str, ...] = ("shm", "nixl", "tcp")
    lease_slack_s: float = 0.5  # lease asked = time left to the deadline + slack
    abort_timeout_s: float = 1.0
    max_idle_per_peer: int = 8


@dataclass
class _Conn:
    address: Address
    sock: socket.socket
    backend: TransferBackend
    peer: str
    alive: bool = True

    def close(self) -> None:
        self.alive = False
        with contextlib.suppress(Exception):
            self.backend.disconnect(self.peer)
        self.sock.close()


@dataclass
class _Pool:
    idle: list[_Conn] = field(default_factory=list)


class Sender:
    """``backends`` maps name -> a factory building that backend (called lazily, once); each built backend gets
    ``buffer`` registered. Usually the registry's: ``registry.factories(["shm", "tcp"], BackendOptions(fp,
    token=token))`` (:mod:`pdmesh.transfer.registry`); any ``{name: () -> TransferBackend}`` works.

    ``region``: the chunks' memory as a raw :class:`MemoryRegion` instead (a device staging region: ``VRAM``,
    ``buffer`` None; or host memory, ``buffer`` a view of it). Chunk offsets are then offsets into the region.
    Backends that take regions (NIXL) register it; the others use ``buffer``, and where there is none (device
    memory) they cannot start and the next backend is tried. The caller keeps the memory alive until
    :meth:`close`."""

    def __init__(
        self,
        buffer: memoryview | None,
        config: SenderConfig,
        backends: dict[str, Callable[[], TransferBackend]],
        segment_name: str | None = None,
        *,
        region: MemoryRegion | None = None,
    ) -> None:
        if buffer is None and region is None:
            raise ValueError("a sender needs a buffer or a memory region")
        self.buffer = buffer
        self.region = region
        self.segment_name = segment_name
        self.config = config
        self._factories = backends
        self._built: dict[str, TransferBackend] = {}
        self._lock = threading.Lock()
        self._pools: dict[Address, _Pool] = {}
        self._closed = False
        self._announced: set[tuple[Address, str]] = set()  # (peer, backend) pairs logged once

    def push(
        self, peer_address: Address, transfer_id: str, chunks: Sequence[Chunk], deadline: float
    ) -> PushResult:
        """ALLOC all chunks, WRITE the ones the peer lacks as one batch, COMMIT. Raises TransferError.

        On failure after ALLOC a best-effort ABORT is sent; the peer's leases expire anyway.
        """
        if time.monotonic() >= deadline:
            raise TransferTimeout("deadline passed before the push started")
        for attempt in (0, 1):
            conn, reused = self._checkout(peer_address, deadline)
            try:
                return self._push_on(conn, transfer_id, chunks, deadline)
            except _StaleConnection:
                if attempt or not reused:
                    raise
        raise AssertionError("unreachable")

    def _push_on(self, conn: _Conn, transfer_id: str, chunks: Sequence[Chunk], deadline: float) -> PushResult:
        allocated = False
        try:
            lease_ms = (deadline - time.monotonic() + self.config.lease_slack_s) * 1000.0
            reply = request(
                conn.sock,
                {
                    "op": "alloc",
                    "transfer_id": transfer_id,
                    "keys": [c.key for c in chunks],
                    "sizes": [c.nbytes for c in chunks],
                    "lease_ms": lease_ms,
                },
                "alloc_ok",
                deadline,
            )
            allocated = True
            offsets = reply["offsets"]
            segments, written, skipped = [], [], []
            for c, off in zip(chunks, offsets, strict=True):
                if off is None:
                    skipped.append(c.key)
                else:
                    segments.append(Segment(c.local_offset, c.nbytes, int(off)))
                    written.append(c.key)
            failpoints.hit("transfer.sender.after_alloc")
            if segments:
                handle = conn.backend.write(conn.peer, segments, transfer_id.encode())
                conn.backend.wait(handle, deadline)
            failpoints.hit("transfer.sender.after_write")
            request(conn.sock, {"op": "commit", "transfer_id": transfer_id}, "commit_ok", deadline)
        except BaseException as exc:
            if allocated and not isinstance(exc, IncompatiblePeer):
                self._abort(conn, transfer_id)
            conn.close()
            if isinstance(exc, PeerUnavailable) and not allocated:
                raise _StaleConnection(exc.message) from exc
            if isinstance(exc, TransferError):
                raise
            if isinstance(exc, ValueError):
                raise TransferError(f"bad push: {exc}") from exc
            raise
        self._checkin(conn)
        return PushResult(conn.backend.name, written, skipped, sum(s.length for s in segments))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
            built, self._built = list(self._built.values()), {}
        for p in pools:
            for c in p.idle:
                c.close()
        for b in built:
            b.close()

    def warm(self) -> list[str]:
        """Build every backend and register the buffer with it now (blocking), so that the first push does not pay
        for it (NIXL: creating the agent and registering the pool take seconds). A backend that cannot start is
        skipped (a push will report it). Returns the names built. Safe to run in a thread beside pushes and
        :meth:`close`."""
        built = []
        for name in self.config.backends:
            if name not in self._factories:
                continue
            try:
                self._backend(name)
                built.append(name)
            except Exception as exc:
                log.warning("transfer backend %s cannot start (%s); pushes will use the others", name, exc)
        return built

    # connections
    def _backend(self, name: str) -> TransferBackend:
        with self._lock:
            if self._closed:
                raise PeerUnavailable("sender is closed")
            b = self._built.get(name)
            if b is not None:
                return b
        made = self._factories[name]()  # outside the lock: building NIXL takes seconds
        try:
            reached = register_into(made, self.buffer, self.segment_name, self.region)
        except BaseException:
            made.close()
            raise
        if not reached:
            made.close()
            kind = self.region.mem_type if self.region is not None else "host"
            raise PeerUnavailable(f"{name} backend cannot read {kind} memory")
        with self._lock:
            b = self._built.get(name)
            if b is None and not self._closed:
                self._built[name] = made
                return made
        made.close()  # built twice concurrently, or closed meanwhile
        if b is None:
            raise PeerUnavailable("sender is closed")
        return b

    def _checkout(self, address: Address, deadline: float) -> tuple[_Conn, bool]:
        with self._lock:
            pool = self._pools.get(address)
            if pool and pool.idle:
                return pool.idle.pop(), True
        sock = connect(address, deadline)
        try:
            wanted = [b for b in self.config.backends if b in self._factories]
            hello = client_handshake(
                sock,
                {
                    "op": "hello",
                    "v": PROTOCOL_VERSION,
                    "fingerprint": self.config.fingerprint,
                    "engine": self.config.engine(),
                    "backends": wanted,
                },
                "hello_ok",
                self.config.token,
                deadline,
            )
            if hello.get("v") != PROTOCOL_VERSION or hello.get("fingerprint") != self.config.fingerprint:
                raise IncompatiblePeer(
                    f"peer answered fingerprint {hello.get('fingerprint')!r} v{hello.get('v')}"
                )
            if engines_differ(self.config.engine(), hello.get("engine")):
                raise IncompatiblePeer(
                    f"peer's engine {str(hello.get('engine'))[:64]!r} != ours {self.config.engine()!r} "
                    "(another model, dtype or KV layout)"
                )
            offered: dict = hello["metadata"]
            errors = []
            for name in wanted:
                if name not in offered:
                    continue
                try:
                    backend = self._backend(name)
                except Exception as exc:  # e.g. NIXL/UCX that cannot start here: the next backend may
                    errors.append(f"{name}: cannot start: {exc}")
                    continue
                try:
                    peer = backend.connect(bytes(offered[name]))
                except TransferError as exc:
                    errors.append(f"{name}: {exc}")
                    continue
                if (address, name) not in self._announced:
                    self._announced.add((address, name))
                    skipped = f" ({'; '.join(errors)})" if errors else ""
                    log.info("pushing to %s:%d over %s%s", address[0], address[1], name, skipped)
                return _Conn(address, sock, backend, peer), False
            raise IncompatiblePeer(f"no usable backend with {address}: {'; '.join(errors) or 'none offered'}")
        except BaseException:
            sock.close()
            raise

    def _checkin(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed and conn.alive:
                pool = self._pools.setdefault(conn.address, _Pool())
                if len(pool.idle) < self.config.max_idle_per_peer:
                    pool.idle.append(conn)
                    return
        conn.close()

    def _abort(self, conn: _Conn, transfer_id: str) -> None:
        with contextlib.suppress(Exception):
            request(
                conn.sock,
                {"op": "abort", "transfer_id": transfer_id},
                "abort_ok",
                time.monotonic() + self.config.abort_timeout_s,
            )
