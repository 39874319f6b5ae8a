"""The tier server's end of PD transfer: a receiver other nodes push into, and a sender for our own pushes.

- The receiver writes straight into this node's pool through :class:`LeaseRegionProvider`:
  pushed chunks are leased regions until COMMIT makes them ready, reused only as :mod:`pdmesh.transfer.leases`
  allows (after grace; for shm/NIXL writes once the sender showed it stopped, or after ``one_sided_hold_s``).
- :meth:`TransferNode.push` pins the chunks it sends for the whole push (they cannot be evicted or reused while
  the peer reads or is written from them), and unpins them afterwards whatever happens. Blocking: the tier
  server calls it from a worker thread (``asyncio.to_thread``), so its event loop never waits on the network.
- Backends are built by name through :mod:`pdmesh.transfer.registry` and tried in order (same host: shared
  memory; else NIXL/UCX; else TCP); the first that connects wins. The handshake refuses a peer whose compatibility
  fingerprint differs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdmesh.kvcache.pool import ChunkPool, PoolFull
from pdmesh.transfer import registry
from pdmesh.transfer.backend import TransferBackend
from pdmesh.transfer.errors import PoolExhausted, TransferError
from pdmesh.transfer.protocol import no_engine
from pdmesh.transfer.receiver import Receiver, ReceiverConfig
from pdmesh.transfer.registry import BackendOptions
from pdmesh.transfer.sender import Chunk, PushResult, Sender, SenderConfig

log = logging.getLogger("pdmesh.tier.transfer")


def parse_address(peer: str) -> tuple[str, int]:
    host, sep, port = peer.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"transfer address {peer!r} must be host:port")
    return host.strip("[]"), int(port)


def _factories(
    fingerprint: str, token: str, host: str, advertise_host: str, names: Sequence[str]
) -> dict[str, Callable[[], TransferBackend]]:
    """This node's factory for each backend in ``names``, in order, from the transfer registry
    (:mod:`pdmesh.transfer.registry`); :class:`~pdmesh.transfer.registry.UnknownBackend` (a ValueError) for a
    name it lacks."""
    options = BackendOptions(fingerprint, token=token, host=host, advertise_host=advertise_host)
    return registry.factories(names, options)


def _start_backends(factories: dict[str, Callable[[], TransferBackend]]) -> list[TransferBackend]:
    """Build the receiver's backends; one that cannot start here (NIXL without a usable UCX transport) is left
    out with a warning as long as another one is left."""
    built: list[TransferBackend] = []
    for name, make in factories.items():
        try:
            built.append(make())
        except Exception as e:
            if len(factories) == 1:
                raise
            log.warning("transfer backend %s cannot start (%s); offering the others", name, e)
    if not built:
        raise RuntimeError("no transfer backend could start")
    return built


class LeaseRegionProvider:
    """Adapter: a :class:`ChunkPool` as the transfer receiver's ``RegionProvider`` (``pdmesh.transfer.provider``).
    ``alloc`` takes the receiver's absolute lease deadline (the latest time the receiver would free the region,
    grace included: the pool's own reclaim is a backstop) and raises the transfer layer's ``PoolExhausted`` when
    the pool is full."""

    def __init__(self, pool: ChunkPool) -> None:
        self.pool = pool
        self.buffer = pool.buffer
        self.segment_name: str | None = pool.segment_name

    def alloc(self, key: bytes, nbytes: int, lease_deadline: float) -> int | None:
        try:
            a = self.pool.alloc_until(key, nbytes, lease_deadline)
        except PoolFull as e:
            raise PoolExhausted(str(e)) from e
        return None if a is None else a.offset

    def commit(self, key: bytes) -> None:
        self.pool.commit(key)

    def abort(self, key: bytes) -> None:
        self.pool.abort(key)

    def reclaim_expired(self, now: float) -> int:
        return self.pool.reclaim_expired(now)


@dataclass
class PushStats:
    pushes: int = 0
    failures: int = 0
    chunks: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    by_backend: dict[str, int] = field(default_factory=dict)  # pushes that went over each backend


class TransferNode:
    def __init__(
        self,
        pool: ChunkPool,
        fingerprint: str,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        backends: Sequence[str] = ("shm", "tcp"),
        engine: Callable[[], str] = no_engine,
    ) -> None:
        """``engine``: the digest of the model fingerprint of the chunks this node holds, read at each handshake
        (peers of another engine are refused both ways); ``""`` while the tier has not learned it."""
        self.pool = pool
        self.advertise_host = advertise_host or host
        factories = _factories(fingerprint, token, host, self.advertise_host, backends)
        offered = _start_backends(factories)
        self.backends = [b.name for b in offered]  # what this node's receiver offers, in preference order
        self.receiver = Receiver(
            LeaseRegionProvider(pool),
            ReceiverConfig(fingerprint=fingerprint, engine=engine, host=host, port=port, token=token),
            offered,
        )
        self.sender = Sender(
            pool.buffer,
            SenderConfig(fingerprint=fingerprint, engine=engine, token=token, backends=tuple(backends)),
            factories,
            segment_name=pool.segment_name,
        )
        self.stats = PushStats()
        self.address: str | None = None

    def start(self) -> str:
        """Start the receiver and, in a background thread, the sender's backends (so the first push to another
        host does not wait seconds for NIXL's agent and registration); returns the ``host:port`` peers push to."""
        _, port = self.receiver.start()
        self.address = f"{self.advertise_host}:{port}"
        threading.Thread(target=self.sender.warm, name="transfer-warm", daemon=True).start()
        return self.address

    def push(
        self, keys: Sequence[bytes], peer: str, transfer_id: str, deadline_s: float
    ) -> PushResult | None:
        """Push the ready chunks among ``keys`` to ``peer``. Blocking, bounded by ``deadline_s``.

        Returns None when none of the keys is ready here. Raises TransferError (typed, with ``retryable``).
        """
        deadline = time.monotonic() + deadline_s
        pinned = [k for k in keys if self.pool.pin([k])]
        try:
            chunks = []
            for k in pinned:
                loc = self.pool.locate(k)
                if loc is not None:
                    chunks.append(Chunk(k, loc.offset, loc.length))
            if not chunks:
                return None
            t0 = time.perf_counter()
            try:
                result = self.sender.push(parse_address(peer), transfer_id, chunks, deadline)
            except TransferError:
                self.stats.failures += 1
                raise
            self.stats.pushes += 1
            self.stats.by_backend[result.backend] = self.stats.by_backend.get(result.backend, 0) + 1
            self.stats.chunks += len(result.written)
            self.stats.skipped += len(result.skipped)
            self.stats.bytes += result.nbytes
            self.stats.seconds += time.perf_counter() - t0
            return result
        finally:
            if pinned:
                self.pool.unpin(pinned)

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()
