"""NIXL data path (UCX inside: NVLink, RDMA, shared memory/cma, TCP): one-sided WRITE + notification.

Each side owns one ``nixl_agent`` per lane over its registered pool (:func:`lanes_wanted`: 2 unless the host has
RDMA; each lane is its own UCX connection, progress thread and posting thread). The receiver's
metadata is its lanes' agent metadata plus the pool's base address and size; the sender loads it with
``add_remote_agent`` (once per remote agent, refcounted; local lane i loads the peer's lane i, as many as both
run) and posts one descriptor list per lane and batch (``initialize_xfer("WRITE", local, remote, peer, notif)``,
the batch's bytes split into contiguous runs of equal size); the batch is done when every lane's is. ``wait``
polls ``check_xfer_state`` with sleeps that back off (50 .. 200 us): no busy-spin on a 2-core box. On timeout
or error the transfer handles are released, which asks NIXL to cancel them; the receiver's lease grace covers a write
the NIC could still finish after that.

Config: ``NixlConfig.ucx_env`` (e.g. ``{"UCX_NET_DEVICES": "lo", "UCX_TLS": "cma,tcp"}``) is put into the
process environment before the agent is created (UCX reads its settings from there); existing values win unless
``override_env``. ``register_region(ptr, size, "VRAM", device)`` registers device memory on GPU nodes (a
:class:`pdmesh.transfer.device_staging.StagingRegion` on CUDA; UCX then moves it with cuda_ipc on one node, rc
with GPUDirect RDMA between nodes: not run here, no GPU); a WRITE may go from either kind to either kind, each
side's descriptors carry its own. Every agent runs with ``NIXL_THREAD_SYNC_STRICT`` because pushes call it from
several threads; the receiver service drains notifications (which also progresses UCX) from one polling thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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

log = logging.getLogger("pdmesh.transfer")

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
    zero-copy tcp``). UCX's rendezvous and lane settings do not apply to PUTs on one device; ``lanes`` (agents per
    backend, :func:`lanes_wanted`) splits a push over several UCX connections instead."""

    backends: list[str] = field(default_factory=lambda: ["UCX"])
    ucx_env: dict[str, str] = field(default_factory=dict)
    override_env: bool = False
    enable_prog_thread: bool | None = None  # None: see progress_thread_wanted
    num_threads: int = 0
    prog_thread_wait_ms: float = 10.0
    lanes: int | None = None  # None: see lanes_wanted


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


RDMA_DEVICES = "/sys/class/infiniband"


def lanes_wanted(config: NixlConfig) -> int:
    """How many agents (lanes) a backend runs: ``config.lanes`` when set; else ``PDMESH_NIXL_LANES`` when set;
    else 1 where the host has an RDMA device (under ``/sys/class/infiniband``: one agent already uses every rail),
    else 2. A push's bytes split over the lanes, each lane's WRITE posted from its own thread: over UCX's TCP
    transport each lane is its own connection and progress thread (one stream is bounded by one core's copies on
    each side; veth pair, 96 MiB pushes: 1.7 -> 2.0-2.4 GB/s); over cma (one host) each lane's copy runs in its
    posting thread (256 MiB: 0.35-0.45x -> 0.64-0.71x memcpy)."""
    if config.lanes is not None:
        return max(1, config.lanes)
    forced = os.environ.get("PDMESH_NIXL_LANES", "").strip()
    if forced:
        try:
            return max(1, int(forced))
        except ValueError:
            log.warning("PDMESH_NIXL_LANES=%r is not a number: ignored", forced)
    try:
        rdma = bool(os.listdir(RDMA_DEVICES))
    except OSError:
        rdma = False
    return 1 if rdma else 2


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


def _lane_rows(segments: Sequence[Segment], lanes: int) -> list[list[tuple[int, int, int]]]:
    """The segments as (local_offset, length, remote_offset) rows for ``lanes`` lanes: contiguous runs whose bytes
    differ by at most one, a segment cut where a lane's share ends; fewer lanes only when there are fewer bytes."""
    total = sum(s.length for s in segments)
    lanes = max(1, min(lanes, total))
    base, extra = divmod(total, lanes)
    shares = [base + (i < extra) for i in range(lanes)]  # differ by at most one byte
    out: list[list[tuple[int, int, int]]] = [[]]
    room = shares[0]
    for s in segments:
        done = 0
        while done < s.length:
            if room == 0:
                out.append([])
                room = shares[len(out) - 1]
            n = min(room, s.length - done)
            out[-1].append((s.local_offset + done, n, s.remote_offset + done))
            done += n
            room -= n
    return [rows for rows in out if rows]


def _outcome(fn: Callable[[], Any]) -> Any:
    """``fn()``'s result, or the exception it raised (returned, not raised)."""
    try:
        return fn()
    except BaseException as exc:
        return exc


@dataclass
class _Remote:
    name: str
    base: int
    size: int
    mem_type: str
    device: int
    refs: int
    lanes: list[str] = field(
        default_factory=list
    )  # remote agent name per local lane used (lane 0's is ``name``)


@dataclass
class _Handle:
    xfers: list[tuple[Any, Any]]  # (agent, transfer handle) per lane used
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
        self._agents = [self._agent]
        for i in range(1, lanes_wanted(self.config)):
            try:
                self._agents.append(_make_agent(f"{self.agent_name}-l{i}", self.config))
            except Exception as exc:  # one lane works: run with the lanes made
                log.warning("nixl: lane %d not created (%s); running %d lane(s)", i, exc, len(self._agents))
                break
        self._lock = threading.Lock()
        self._remotes: dict[str, _Remote] = {}
        self._reg: Any = None
        self._lane_regs: list[Any] = []
        self._pool: ThreadPoolExecutor | None = None
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
        regs: list[Any] = []
        try:
            for agent in self._agents:
                regs.append(agent.register_memory([(address, size, device, "")], mem_type))
        except BaseException:
            for agent, reg in zip(self._agents, regs, strict=False):
                with contextlib.suppress(Exception):
                    agent.deregister_memory(reg)
            raise
        self._reg, self._lane_regs = regs[0], regs[1:]
        self._base, self._size, self._mem_type, self._device = address, size, mem_type, device

    @property
    def lanes(self) -> int:
        """Agents this backend runs (:func:`lanes_wanted`); a push uses as many as both sides have."""
        return len(self._agents)

    def local_metadata(self) -> bytes:
        if self._reg is None:
            raise TransferFailed("register_memory first")
        return pack_metadata(
            self.name,
            self.fingerprint,
            {
                "agent": self._agent.get_agent_metadata(),
                "lanes": [a.get_agent_metadata() for a in self._agents[1:]],
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
                r.lanes = [name, *self._connect_lanes(md.get("lanes") or [])]
                self._remotes[name] = r
            r.refs += 1
        return name

    def _connect_lanes(self, extra: list) -> list[str]:
        """Local lane i (i >= 1) loads the peer's lane i; as many as both sides have. A lane that cannot load it
        ends the list (the push then uses fewer lanes), never the connection."""
        names: list[str] = []
        for agent, md in zip(self._agents[1:], extra, strict=False):
            try:
                n = agent.add_remote_agent(bytes(md))
            except Exception:
                break
            names.append(n.decode() if isinstance(n, bytes) else str(n))
        return names

    def write(self, peer: str, segments: Sequence[Segment], notif: bytes) -> _Handle:
        r = self._remotes.get(peer)
        if r is None or self._reg is None:
            raise PeerUnavailable(f"nixl peer {peer} not connected")
        check_segments(segments, self._size, r.size)
        lanes = r.lanes
        try:
            return self._post(r, peer, _lane_rows(segments, len(lanes)), notif)
        except TransferError:
            if len(lanes) == 1:
                raise
        # a lane beyond the first failed to post: this peer is served over the first lane from now on
        log.warning("nixl: a lane to %s failed to post; pushing to it over one lane", peer)
        r.lanes = lanes[:1]
        return self._post(r, peer, _lane_rows(segments, 1), notif)

    def _post(self, r: _Remote, peer: str, rows: list[list[tuple[int, int, int]]], notif: bytes) -> _Handle:
        """One WRITE per lane (lane i gets ``rows[i]``), lanes beyond the first posted from the backend's posting
        threads at the same time as the first from the caller's (UCX may move the bytes inside the post: cma
        copies there); every lane's post is waited for, and on any failure every WRITE posted is released."""
        if not rows:  # nothing to move
            return _Handle([], "DONE", peer)
        posts = [(self._agents[lane], r.lanes[lane], lane_rows) for lane, lane_rows in enumerate(rows)]
        futures = [self._posting_pool().submit(self._post_lane, r, *p, notif) for p in posts[1:]]
        outcomes = [_outcome(lambda: self._post_lane(r, *posts[0], notif))]
        outcomes += [_outcome(fut.result) for fut in futures]
        done = [o for o in outcomes if not isinstance(o, BaseException)]
        posted = [(agent, xfer) for agent, xfer, _ in done]
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors or any(status == "ERR" for _, _, status in done):
            self._release(posted)
            if not errors:
                raise TransferFailed(f"nixl: write to {peer} failed to post", retryable=True)
            if isinstance(errors[0], TransferError) or not isinstance(errors[0], Exception):
                raise errors[0]
            raise PeerUnavailable(f"nixl: cannot post write to {peer}: {errors[0]}") from errors[0]
        status = "PROC" if any(status == "PROC" for _, _, status in done) else "DONE"
        return _Handle(posted, status, peer)

    def _post_lane(
        self, r: _Remote, agent: Any, lane_peer: str, rows: list[tuple[int, int, int]], notif: bytes
    ) -> tuple[Any, Any, str]:
        """(agent, transfer handle, status) of one lane's WRITE; the handle is the caller's to release."""
        local = np.array([(self._base + lo, n, self._device) for lo, n, _ in rows], dtype=np.uint64)
        remote = np.array([(r.base + ro, n, r.device) for _, n, ro in rows], dtype=np.uint64)
        ldescs = agent.get_xfer_descs(local, self._mem_type)
        rdescs = agent.get_xfer_descs(remote, r.mem_type)
        xfer = agent.initialize_xfer("WRITE", ldescs, rdescs, lane_peer, notif)
        try:
            return agent, xfer, agent.transfer(xfer)
        except BaseException:
            self._release([(agent, xfer)])
            raise

    def _posting_pool(self) -> ThreadPoolExecutor:
        """Threads that post lanes 2..n (made on first use; shut down by :meth:`close`)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max(1, len(self._agents) - 1), thread_name_prefix=f"nixl-post-{self.agent_name}"
                )
            return self._pool

    def wait(self, handle: _Handle, deadline: float) -> None:
        """Every lane's transfer DONE (or the first error, or ``deadline``); releases them all in any case. The
        lanes still running are checked together each round (a check also progresses that lane's worker)."""
        pending = list(handle.xfers) if handle.status == "PROC" else []
        delay = POLL_MIN_S
        try:
            while pending:
                still = []
                for agent, xfer in pending:
                    status = agent.check_xfer_state(xfer)
                    if status == "PROC":
                        still.append((agent, xfer))
                    elif status != "DONE":
                        raise TransferFailed(f"nixl write to {handle.peer} failed ({status})", retryable=True)
                pending = still
                if not pending:
                    break
                if time.monotonic() > deadline:
                    raise TransferTimeout(f"nixl write to {handle.peer} passed its deadline")
                time.sleep(delay)
                delay = min(delay * 2, POLL_MAX_S)
        except TransferError:
            raise
        except Exception as exc:
            raise TransferFailed(f"nixl write to {handle.peer} failed: {exc}", retryable=True) from exc
        finally:
            self._release(handle.xfers)

    @staticmethod
    def _release(xfers: list[tuple[Any, Any]]) -> None:
        for agent, xfer in xfers:
            try:
                agent.release_xfer_handle(xfer)
            except Exception:
                pass  # NIXL keeps it on its leaked list and retries at agent teardown

    def get_notifs(self) -> list[tuple[str, bytes]]:
        """Drain (and so progress) every lane; a push over several lanes gives one notification per lane."""
        if self._closed:
            return []
        out: list[tuple[str, bytes]] = []
        for agent in self._agents:
            notifs = agent.get_new_notifs()
            out += [(str(peer), bytes(m)) for peer, msgs in notifs.items() for m in msgs]
        return out

    def disconnect(self, peer: str) -> None:
        with self._lock:
            r = self._remotes.get(peer)
            if r is None:
                return
            r.refs -= 1
            if r.refs <= 0:
                del self._remotes[peer]
                self._remove(r)

    def _remove(self, r: _Remote) -> None:
        for agent, name in zip(self._agents, r.lanes, strict=False):
            try:
                agent.remove_remote_agent(name)
            except Exception:
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # no post is left running on an agent about to go
        with self._lock:
            for r in self._remotes.values():
                self._remove(r)
            self._remotes.clear()
        if self._reg is not None:
            for agent, reg in zip(self._agents, [self._reg, *self._lane_regs], strict=False):
                try:
                    agent.deregister_memory(reg)
                except Exception:
                    pass
            self._reg, self._lane_regs = None, []
