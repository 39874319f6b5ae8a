"""The small backend interface: how chunk bytes move once the control protocol has allocated regions.

Shaped like NIXL's agent API. One backend instance lives on each side of a transfer, over that side's pool:

* both sides: ``register_memory(buffer)`` once (the whole tier pool, a writable buffer), then ``local_metadata()``
  is what a peer needs to write into it (sent in the control handshake);
* sender: ``connect(peer_metadata) -> peer`` (checks the compatibility fingerprint embedded in the metadata and
  raises :class:`IncompatiblePeer` on mismatch), ``write(peer, segments, notif) -> handle`` posts ONE descriptor
  list for a whole batch of chunks and returns the backend's :class:`WriteHandle` (each backend has its own
  subclass: ``TransferBackend[H]`` is generic in it), ``wait(handle, deadline)`` drives it to completion or raises
  a typed error by the deadline (after which nothing of the batch is still being written by this process),
  ``disconnect(peer)``;
* receiver: ``get_notifs()`` drains completion notifications (``notif`` bytes of finished writes), and
  ``set_write_guard(guard)`` lets backends that see writes arrive (TCP) check them against live leases;
* ``close()`` releases everything (idempotent).

How a backend is built: :meth:`TransferBackend.from_options` from one :class:`BackendOptions` (everything any
backend may need), by name through :mod:`pdmesh.transfer.registry`; :meth:`TransferBackend.available` says whether
it can start in this process at all (NIXL: importable).

Offsets are byte offsets into the registered buffers. Backends never allocate: the receiver's RegionProvider
does (see :mod:`transfer.provider`).

Device memory: a side may expose a :class:`MemoryRegion` (raw address, size, ``DRAM`` or ``VRAM`` + CUDA device)
instead of, or besides, a host buffer (:mod:`pdmesh.transfer.device_staging`). :func:`register_into` registers
what a backend can reach: the region with backends whose ``region_mem_types`` include its kind (NIXL: both), the
host buffer with the others; a backend that can reach neither (TCP or shm and device memory) is left out.
"""

from __future__ import annotations

import ctypes
import socket
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import msgpack

from pdmesh.transfer.errors import IncompatiblePeer
from pdmesh.transfer.nixl_agent import NixlConfig

METADATA_VERSION = 1
MEM_TYPES = ("DRAM", "VRAM")


@dataclass(frozen=True)
class MemoryRegion:
    """Raw memory for a backend to register: host memory (``DRAM``) or device memory (``VRAM`` on CUDA device
    ``device``). Whoever built it owns the memory and keeps it allocated, at the same address, until every backend
    it was registered with is closed (backends never free it)."""

    address: int
    size: int
    mem_type: str = "DRAM"
    device: int = 0

    def __post_init__(self) -> None:
        if self.mem_type not in MEM_TYPES:
            raise ValueError(f"mem_type must be one of {MEM_TYPES}, not {self.mem_type!r}")
        if self.address <= 0 or self.size <= 0 or self.device < 0:
            raise ValueError(f"bad memory region {self}")


@dataclass(frozen=True)
class Segment:
    """Copy ``length`` bytes from the sender's buffer at ``local_offset`` to the receiver's at ``remote_offset``."""

    local_offset: int
    length: int
    remote_offset: int


@dataclass(frozen=True)
class BackendOptions:
    """Everything a backend may be built from (each takes what it needs, :meth:`TransferBackend.from_options`):

    * ``fingerprint``: the compatibility fingerprint (all backends; peers with another one are refused);
    * ``token``: the cluster token (TCP's data connections authenticate with it);
    * ``host``: where a receiving TCP backend's data listener binds (may be a wildcard), ``advertise_host`` what
      its metadata tells senders to dial (None: ``host``);
    * ``nixl``: the NIXL agent's configuration (None: :class:`NixlConfig`'s defaults).
    """

    fingerprint: str
    token: str = ""
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    nixl: NixlConfig | None = None


@dataclass(frozen=True)
class WriteHandle:
    """A batch posted by :meth:`TransferBackend.write` to ``peer``, owned by the caller until it hands it to that
    same backend's :meth:`~TransferBackend.wait`, exactly once. Opaque to callers: each backend subclasses it
    with what its ``wait`` needs."""

    peer: str


H = TypeVar("H", bound=WriteHandle)


class WriteGuard(Protocol):
    """Receiver-side check for backends that see each write arrive (TCP)."""

    def begin_write(self, notif: bytes, segments: Sequence[tuple[int, int]]) -> float | None:
        """Admit a write of (remote_offset, length) segments for the transfer named by ``notif``.

        Returns the deadline (time.monotonic) by which the write must be over, or None to refuse it. An admitted
        write pins its transfer's leases until :meth:`end_write`.
        """

    def end_write(self, notif: bytes, ok: bool) -> None:
        """The write admitted by :meth:`begin_write` is over (successfully or not)."""


def buffer_address(buf: memoryview) -> int:
    """Address of the first byte of a writable, contiguous buffer (no copy; the export is released at once)."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c


def host_id() -> str:
    """Identifies this host (and boot) for the same-host shared-memory shortcut."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def pack_metadata(backend: str, fingerprint: str, payload: dict[str, Any]) -> bytes:
    """Wrap a backend's metadata payload with its name, format version and the compatibility fingerprint."""
    return msgpack.packb(
        {"backend": backend, "v": METADATA_VERSION, "fingerprint": fingerprint, "payload": payload},
        use_bin_type=True,
    )


def unpack_metadata(data: bytes, backend: str, fingerprint: str) -> dict[str, Any]:
    """Unwrap peer metadata; raise IncompatiblePeer unless backend, version and fingerprint all match."""
    try:
        md = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise IncompatiblePeer(f"unreadable {backend} metadata: {exc}") from exc
    if not isinstance(md, dict) or md.get("backend") != backend or md.get("v") != METADATA_VERSION:
        raise IncompatiblePeer(f"peer metadata is not {backend} v{METADATA_VERSION}")
    if md.get("fingerprint") != fingerprint:
        raise IncompatiblePeer(
            f"fingerprint mismatch: peer {md.get('fingerprint')!r} != local {fingerprint!r}"
        )
    return md["payload"]


def check_segments(segments: Sequence[Segment], local_size: int, remote_size: int) -> None:
    """Raise ValueError if a segment falls outside either buffer."""
    for s in segments:
        if s.length < 0 or s.local_offset < 0 or s.remote_offset < 0:
            raise ValueError(f"negative segment {s}")
        if s.local_offset + s.length > local_size or s.remote_offset + s.length > remote_size:
            raise ValueError(f"segment {s} outside buffers ({local_size}, {remote_size})")


class TransferBackend(ABC, Generic[H]):
    """One side's data path. Thread-safe: many pushes may call write/wait concurrently. ``H``: the backend's
    :class:`WriteHandle` type."""

    name: str = ""
    # The receiving side moves bytes only when progressed (get_notifs): the receiver polls it often during transfers.
    needs_progress: bool = False
    # Kinds of raw MemoryRegion this backend registers with register_region (empty: host buffers only).
    region_mem_types: tuple[str, ...] = ()

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    @classmethod
    def from_options(cls, options: BackendOptions) -> TransferBackend[H]:
        """A new backend built from ``options`` (the fields it uses are its constructor's). Errors of starting
        it propagate (e.g. NIXL without a usable UCX transport). Every backend in the registry implements it;
        the default raises NotImplementedError (a backend only ever built directly, e.g. a test double)."""
        raise NotImplementedError(f"{cls.__name__} is not built from BackendOptions")

    @classmethod
    def available(cls) -> bool:
        """Whether this backend can start in this process at all (its dependencies import): cheap, builds
        nothing. True does not promise that building succeeds (a transport may still be missing)."""
        return True

    @abstractmethod
    def register_memory(self, buffer: memoryview, segment_name: str | None = None) -> None:
        """Register the whole pool buffer (writable, contiguous). ``segment_name`` is its shared-memory name."""

    def register_region(self, address: int, size: int, mem_type: str = "DRAM", device: int = 0) -> None:
        """Register raw memory of a kind in ``region_mem_types`` instead of a buffer (the caller keeps it alive)."""
        raise NotImplementedError(f"{self.name} backend registers host buffers only")

    @abstractmethod
    def local_metadata(self) -> bytes:
        """Everything a peer needs to write into the registered buffer (includes the fingerprint)."""

    @abstractmethod
    def connect(self, peer_metadata: bytes) -> str:
        """Prepare writes to the peer. Returns a peer id. Raises IncompatiblePeer / PeerUnavailable."""

    @abstractmethod
    def write(self, peer: str, segments: Sequence[Segment], notif: bytes) -> H:
        """Post one batch (one descriptor list). Returns its handle for :meth:`wait`. Never blocks for long.
        Raises PeerUnavailable for a peer not connected, ValueError for a segment outside either buffer."""

    @abstractmethod
    def wait(self, handle: H, deadline: float) -> None:
        """Block until the batch is written (remote side complete) or raise a TransferError by ``deadline``
        (time.monotonic). On any exit the handle is released; after an error nothing is still written."""

    def get_notifs(self) -> list[tuple[str, bytes]]:
        """Receiver side: drain (peer, notif) pairs of finished writes. Backends without notifications: []."""
        return []

    def set_write_guard(self, guard: WriteGuard) -> None:
        """Receiver side: install the lease check (only backends that see writes arrive use it)."""

    def disconnect(self, peer: str) -> None:
        """Forget a peer returned by :meth:`connect`."""

    @abstractmethod
    def close(self) -> None:
        """Release all resources. Idempotent."""


def register_into(
    backend: TransferBackend,
    buffer: memoryview | None,
    segment_name: str | None,
    region: MemoryRegion | None,
) -> bool:
    """Register a side's memory with ``backend``: ``region`` when given and of a kind the backend takes, else the
    host ``buffer`` (only when there is no region or the region is host memory: the buffer is then a view of it).
    Returns False, registering nothing, when the backend cannot reach the memory (e.g. TCP and device memory);
    the caller leaves that backend out. Errors of the registration itself propagate."""
    if region is not None and region.mem_type in backend.region_mem_types:
        backend.register_region(region.address, region.size, region.mem_type, region.device)
        return True
    if buffer is not None and (region is None or region.mem_type == "DRAM"):
        backend.register_memory(buffer, segment_name)
        return True
    return False
