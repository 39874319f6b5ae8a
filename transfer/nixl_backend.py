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
process environment before the agent is created (UCX reads its settings from there), then, where UCX's progress
thread runs, ``UCX_USE_MT_MUTEX=y`` (:data:`~pdmesh.transfer.nixl_agent.PROGRESS_THREAD_UCX_DEFAULTS`: waiting
threads sleep instead of spinning through the progress thread's syscalls); existing values win unless
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
    BackendOptions,
    Segment,
    TransferBackend,
    WriteHandle,
    buffer_address,
    check_segments,
    pack_metadata,
    unpack_metadata,
)
from pdmesh.transfer.errors import PeerUnavailable, TransferError, TransferFailed, TransferTimeout
from pdmesh.transfer.nixl_agent import (
    NixlConfig,
    apply_ucx_env,
    lanes_wanted,
    make_agent,
    nixl_available,
    progress_thread_wanted,
)

__all__ = [
    "NixlBackend",
    "NixlConfig",
    "NixlWrite",
    "lanes_wanted",
    "nixl_available",
    "progress_thread_wanted",
]

log = logging.getLogger("pdmesh.transfer")

POLL_MIN_S = 50e-6
POLL_MAX_S = 200e-6


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


@dataclass(frozen=True)
class NixlWrite(WriteHandle):
    """The WRITEs posted for one batch to ``peer``: (agent, transfer handle) per lane used, and ``status``
    ``"DONE"`` (every lane finished inside its post, or nothing to move) or ``"PROC"`` (some still running).
    :meth:`NixlBackend.wait` releases every transfer handle."""

    xfers: list[tuple[Any, Any]]
    status: str


class NixlBackend(TransferBackend[NixlWrite]):
    name = "nixl"
    needs_progress = True  # UCX's TCP transport moves a WRITE's bytes on the target only when progressed
    region_mem_types = ("DRAM", "VRAM")

    def __init__(self, fingerprint: str, config: NixlConfig | None = None) -> None:
        super().__init__(fingerprint)
        self.config = config or NixlConfig()
        apply_ucx_env(self.config)
        self.agent_name = f"pdmesh-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._agent = make_agent(self.agent_name, self.config)
        self._agents = [self._agent]
        for i in range(1, lanes_wanted(self.config)):
            try:
                self._agents.append(make_agent(f"{self.agent_name}-l{i}", self.config))
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

    @classmethod
    def from_options(cls, options: BackendOptions) -> NixlBackend:
        """Uses ``fingerprint`` and ``nixl`` (None: :class:`NixlConfig`'s defaults); creates the agents."""
        return cls(options.fingerprint, options.nixl)

    @classmethod
    def available(cls) -> bool:
        """NIXL's Python API imports (:func:`nixl_available`)."""
        return nixl_available()

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

    def write(self, peer: str, segments: Sequence[Segment], notif: bytes) -> NixlWrite:
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
        for agent, name in zip(self._agents[1:], lanes[1:], strict=False):  # the dropped lanes' remote agents
            with contextlib.suppress(Exception):
                agent.remove_remote_agent(name)
        return self._post(r, peer, _lane_rows(segments, 1), notif)

    def _post(self, r: _Remote, peer: str, rows: list[list[tuple[int, int, int]]], notif: bytes) -> NixlWrite:
        """One WRITE per lane (lane i gets ``rows[i]``), lanes beyond the first posted from the backend's posting
        threads at the same time as the first from the caller's (UCX may move the bytes inside the post: cma
        copies there); every lane's post is waited for, and on any failure every WRITE posted is released."""
        if not rows:  # nothing to move
            return NixlWrite(peer, xfers=[], status="DONE")
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
        return NixlWrite(peer, xfers=posted, status=status)

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

    def wait(self, handle: NixlWrite, deadline: float) -> None:
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
