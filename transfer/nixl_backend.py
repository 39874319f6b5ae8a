"""NIXL data path (UCX inside: NVLink, RDMA, shared memory/cma, TCP): one-sided WRITE + notification.

Each side owns one ``nixl_agent`` over its registered pool. The receiver's metadata is its agent metadata plus the
pool's base address and size; the sender loads it with ``add_remote_agent`` (once per remote agent, refcounted)
and posts one descriptor list per batch (``initialize_xfer("WRITE", local, remote, peer, notif)``). ``wait``
polls ``check_xfer_state`` with sleeps that back off (50 us .. 2 ms): no busy-spin on a 2-core box. On timeout
or error the transfer handle is released, which asks NIXL to cancel it; the receiver's lease grace covers a write
the NIC could still finish after that.

Config: ``NixlConfig.ucx_env`` (e.g. ``{"UCX_NET_DEVICES": "lo", "UCX_TLS": "cma,tcp"}``) is put into the
process environment before the agent is created (UCX reads its settings from there); existing values win unless
``override_env``. ``register_region(ptr, size, "VRAM", device)`` registers device memory on GPU nodes (a
:class:`pdmesh.transfer.device_staging.StagingRegion` on CUDA; UCX then moves it with cuda_ipc on one node, rc
with GPUDirect RDMA between nodes: not run here, no GPU); a WRITE may go from either kind to either kind, each
side's descriptors carry its own. The agent runs with ``NIXL_THREAD_SYNC_STRICT`` because pushes call it from
several threads; the receiver service drains notifications (which also progresses UCX) from one polling thread.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdmesh.transfer.backend import (
    Segment,
    TransferBackend,
    buffer_address,
    check_segments,
    pack_metadata,
    unpack_metadata,
)
from pdmesh.transfer.errors import PeerUnavailable, TransferError, TransferFailed, TransferTimeout

POLL_MIN_S = 50e-6
POLL_MAX_S = 200e-6


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class NixlConfig:
    """How the NIXL agent is built. The defaults are the measured best on loopback (``bench/bench_transfer.py``,
    docs/transfer.md), where UCX moves host memory with cma (``process_vm_writev``, done by the sender):

    * ``UCX_TLS``: left to UCX. ``tcp`` runs 0.18x memcpy against cma's 0.43x; UCX's shared-memory transports
      alone (``posix``, ``sysv``) cannot serve NIXL (creating the backend fails: no RMA).
    * descriptors per WRITE (1, 8, 64 pieces of 256 MiB), 4 WRITEs in flight, 2 posting threads, UCX
      ``num_workers=2``: all within 5 % of one descriptor (one copying thread does the work either way).
    * registration is already once per pool (at start), not per push.
    What moves cma is the page size of the receiving pool: into 4 KiB tmpfs pages (``/dev/shm``) 0.43x memcpy,
    into huge pages 0.58x (a tmpfs mounted ``huge=within_size``/``always``) and 0.86x (anonymous THP memory).
    That is a mount option of the node, not a setting here.

    Between hosts (UCX's TCP transport, ``bench/bench_transfer_hosts.py``) UCX moves a WRITE's bytes only when a
    worker is progressed, on both sides. ``enable_prog_thread`` (default: :func:`progress_thread_wanted`, on unless
    UCX is confined to loopback) runs UCX's progress thread, which sleeps in ``poll()`` on the workers' event fds and wakes when a
    socket is ready (at the latest every ``prog_thread_wait_ms``: 0.7 % of a core while idle), instead of the
    sender's wait and the receiver's poller progressing it every 0.2-0.5 ms: +3-6 % per request push on the veth
    pair. (The stock wrapper runs that thread with no wait: a core at 100 % while idle.) Tried there and no
    help: ``UCX_TCP_SNDBUF``/``UCX_TCP_RCVBUF`` 8 MiB, ``UCX_TCP_TX_SEG_SIZE``/``RX_SEG_SIZE`` 512 KiB (they size
    active messages; a WRITE is one zero-copy PUT per descriptor, ``UCX_PROTO_INFO=y``: ``ucp_put* 0..inf
    zero-copy tcp``). Rendezvous and lane settings do not apply to PUTs on one device."""

    backends: list[str] = field(default_factory=lambda: ["UCX"])
    ucx_env: dict[str, str] = field(default_factory=dict)
    override_env: bool = False
    enable_prog_thread: bool | None = None  # None: see progress_thread_wanted
    num_threads: int = 0
    prog_thread_wait_ms: float = 10.0


def progress_thread_wanted(config: NixlConfig) -> bool:
    """``config.enable_prog_thread`` when set; else ``PDMESH_NIXL_PROG_THREAD`` (``0`` off, anything else on) when
    set; else on unless ``UCX_NET_DEVICES`` is ``lo`` alone (read after ``ucx_env`` is applied). Between hosts UCX's
    TCP transport needs progress on both sides (the thread: +3-6 % per request push on the veth pair); confined to
    one host, UCX copies with cma in the initiator's own call and the thread only competes for the cores
    (``bench/bench_transfer.py``, alternating runs: a request push 0.47-0.51x memcpy without it, 0.41-0.43x with)."""
    if config.enable_prog_thread is not None:
        return config.enable_prog_thread
    forced = os.environ.get("PDMESH_NIXL_PROG_THREAD")
    if forced is not None:
        return forced.strip() != "0"
    return os.environ.get("UCX_NET_DEVICES", "").strip() != "lo"


def _make_agent(name: str, config: NixlConfig) -> Any:
    """A ``nixl_agent`` whose progress thread (when on) sleeps in ``poll()`` on UCX's event fds for at most
    ``config.prog_thread_wait_ms`` instead of spinning: the Python wrapper hard-codes the thread's delay to 0,
    which makes its ``poll()`` return at once (a core at 100 % while idle). The agent is made without backends,
    its core agent is replaced by one built with the delay set, then the backends are created on that one."""
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

    strict = nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
    prog_thread = progress_thread_wanted(config)
    custom = prog_thread and config.prog_thread_wait_ms > 0
    agent = nixl_agent(
        name,
        nixl_agent_config(
            enable_prog_thread=prog_thread,
            backends=[] if custom else list(config.backends),
            num_threads=config.num_threads,
            sync_mode=strict,
        ),
    )
    if not custom:
        return agent
    from nixl._api import nixlBind  # type: ignore[attr-defined]

    core = nixlBind.nixlAgentConfig()
    core.useProgThread = True
    core.useListenThread = False
    core.syncMode = strict.value
    core.pthrDelay = int(config.prog_thread_wait_ms * 1000)  # us; UCX's thread rounds it up to whole ms
    core.lthrDelay = 100000
    core.captureTelemetry = False
    agent.agent = nixlBind.nixlAgent(name, core)
    init = {"num_threads": str(config.num_threads)} if config.num_threads > 0 else {}
    for backend in config.backends:
        agent.create_backend(backend, init)
    return agent


@dataclass
class _Remote:
    name: str
    base: int
    size: int
    mem_type: str
    device: int
    refs: int


@dataclass
class _Handle:
    xfer: Any
    status: str
    peer: str


class NixlBackend(TransferBackend):
    name = "nixl"
    needs_progress = True  # UCX's TCP transport moves a WRITE's bytes on the target only when progressed
    region_mem_types = ("DRAM", "VRAM")

    def __init__(self, fingerprint: str, config: NixlConfig | None = None) -> None:
        super().__init__(fingerprint)
        self.config = config or NixlConfig()
        for k, v in self.config.ucx_env.items():
            if self.config.override_env or k not in os.environ:
                os.environ[k] = v
        self.agent_name = f"pdmesh-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._agent = _make_agent(self.agent_name, self.config)
        self._lock = threading.Lock()
        self._remotes: dict[str, _Remote] = {}
        self._reg: Any = None
        self._base = 0
        self._size = 0
        self._mem_type = "DRAM"
        self._device = 0
        self._closed = False

    def register_memory(self, buffer: memoryview, segment_name: str | None = None) -> None:
        self.register_region(buffer_address(buffer), buffer.nbytes, "DRAM", 0)

    def register_region(self, address: int, size: int, mem_type: str = "DRAM", device: int = 0) -> None:
        """Register raw memory (host ``DRAM`` or device ``VRAM`` on CUDA device ``device``) with the agent, once.
        The caller keeps it allocated until :meth:`close` (which deregisters it). VRAM needs a CUDA build of UCX
        and a CUDA context on ``device`` in this process (allocate the memory there first)."""
        if self._reg is not None:
            raise TransferFailed("nixl backend: memory already registered")
        if mem_type not in self.region_mem_types:
            raise ValueError(
                f"nixl backend: mem_type must be one of {self.region_mem_types}, not {mem_type!r}"
            )
        self._reg = self._agent.register_memory([(address, size, device, "")], mem_type)
        self._base, self._size, self._mem_type, self._device = address, size, mem_type, device

    def local_metadata(self) -> bytes:
        if self._reg is None:
            raise TransferFailed("register_memory first")
        return pack_metadata(
            self.name,
            self.fingerprint,
            {
                "agent": self._agent.get_agent_metadata(),
                "base": self._base,
                "size": self._size,
                "mem_type": self._mem_type,
                "device": self._device,
            },
        )

    def connect(self, peer_metadata: bytes) -> str:
        md = unpack_metadata(peer_metadata, self.name, self.fingerprint)
        with self._lock:
            try:
                name = self._agent.add_remote_agent(bytes(md["agent"]))
            except Exception as exc:
                raise PeerUnavailable(f"nixl: cannot load peer metadata: {exc}") from exc
            name = name.decode() if isinstance(name, bytes) else str(name)
            r = self._remotes.get(name)
            if r is None:
                r = _Remote(name, int(md["base"]), int(md["size"]), str(md["mem_type"]), int(md["device"]), 0)
                self._remotes[name] = r
            r.refs += 1
        return name

    def write(self, peer: str, segments: Sequence[Segment], notif: bytes) -> _Handle:
        r = self._remotes.get(peer)
        if r is None or self._reg is None:
            raise PeerUnavailable(f"nixl peer {peer} not connected")
        check_segments(segments, self._size, r.size)
        n = len(segments)
        local = np.empty((n, 3), dtype=np.uint64)
        remote = np.empty((n, 3), dtype=np.uint64)
        for i, s in enumerate(segments):
            local[i] = (self._base + s.local_offset, s.length, self._device)
            remote[i] = (r.base + s.remote_offset, s.length, r.device)
        try:
            ldescs = self._agent.get_xfer_descs(local, self._mem_type)
            rdescs = self._agent.get_xfer_descs(remote, r.mem_type)
            xfer = self._agent.initialize_xfer("WRITE", ldescs, rdescs, peer, notif)
            status = self._agent.transfer(xfer)
        except Exception as exc:
            raise PeerUnavailable(f"nixl: cannot post write to {peer}: {exc}") from exc
        if status == "ERR":
            self._release(xfer)
            raise TransferFailed(f"nixl: write to {peer} failed to post", retryable=True)
        return _Handle(xfer, status, peer)

    def wait(self, handle: _Handle, deadline: float) -> None:
        delay = POLL_MIN_S
        status = handle.status
        try:
            while status == "PROC":
                if time.monotonic() > deadline:
                    raise TransferTimeout(f"nixl write to {handle.peer} passed its deadline")
                time.sleep(delay)
                delay = min(delay * 2, POLL_MAX_S)
                status = self._agent.check_xfer_state(handle.xfer)
            if status != "DONE":
                raise TransferFailed(f"nixl write to {handle.peer} failed ({status})", retryable=True)
        except TransferError:
            raise
        except Exception as exc:
            raise TransferFailed(f"nixl write to {handle.peer} failed: {exc}", retryable=True) from exc
        finally:
            self._release(handle.xfer)

    def _release(self, xfer: Any) -> None:
        try:
            self._agent.release_xfer_handle(xfer)
        except Exception:
            pass  # NIXL keeps it on its leaked list and retries at agent teardown

    def get_notifs(self) -> list[tuple[str, bytes]]:
        if self._closed:
            return []
        notifs = self._agent.get_new_notifs()
        return [(str(peer), bytes(m)) for peer, msgs in notifs.items() for m in msgs]

    def disconnect(self, peer: str) -> None:
        with self._lock:
            r = self._remotes.get(peer)
            if r is None:
                return
            r.refs -= 1
            if r.refs <= 0:
                del self._remotes[peer]
                try:
                    self._agent.remove_remote_agent(peer)
                except Exception:
                    pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for name in list(self._remotes):
                try:
                    self._agent.remove_remote_agent(name)
                except Exception:
                    pass
            self._remotes.clear()
        if self._reg is not None:
            try:
                self._agent.deregister_memory(self._reg)
            except Exception:
                pass
            self._reg = None
