"""How a NIXL agent is made for pdmesh: the configuration (:class:`NixlConfig`), when UCX's progress thread runs
(:func:`progress_thread_wanted`), how many agents (lanes) a backend runs (:func:`lanes_wanted`), and the agent
itself (:func:`make_agent`: the progress thread sleeping in ``poll()`` instead of spinning). The data path over
those agents is :mod:`pdmesh.transfer.nixl_backend`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("pdmesh.transfer")


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

PROGRESS_THREAD_UCX_DEFAULTS = {"UCX_USE_MT_MUTEX": "y"}
"""UCX settings pdmesh applies where UCX's progress thread runs, unless the environment (or
``NixlConfig.ucx_env``) sets them.

``UCX_USE_MT_MUTEX=y``: a multi-threaded UCX worker guards itself with a mutex instead of a spinlock. With the
progress thread, several threads enter a sender's worker (the progress thread, inside ``sendmsg`` for the length of
a socket buffer; the lane's posting thread; ``wait``'s ``check_xfer_state``), and with the spinlock the waiting
ones spin through each such syscall: 14 % of this 2-core box's cycles in ``pthread_spin_lock`` during pushes
across the veth pair (``perf record -a``), taken from the copies that move the bytes. With the mutex they sleep:
pushes taking turns, 1.09-1.25x the TCP backend's GB/s where the spinlock gave 0.92-1.01x
(``bench/bench_transfer_hosts.py``). Without the progress thread (one host, cma copies inside the post) nothing
spins through a syscall and the default stays: loopback request pushes 0.47-0.82x memcpy with the spinlock,
0.68-0.70x with the mutex (``bench/bench_transfer.py``, within this box's noise)."""


def apply_ucx_env(config: NixlConfig) -> None:
    """Put ``config.ucx_env`` and then, when :func:`progress_thread_wanted`, :data:`PROGRESS_THREAD_UCX_DEFAULTS`
    into the process environment, where UCX reads its settings when the agent creates its backend. A value already
    in the environment wins (an operator's ``UCX_*`` overrides ours) unless ``config.override_env`` is set, which
    lets ``ucx_env``'s own keys replace it. The environment is the process's: what is set stays for the agents made
    after (with or without a progress thread) and for child processes."""
    for k, v in config.ucx_env.items():
        if config.override_env or k not in os.environ:
            os.environ[k] = v
    if progress_thread_wanted(config):
        for k, v in PROGRESS_THREAD_UCX_DEFAULTS.items():
            os.environ.setdefault(k, v)


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


def make_agent(name: str, config: NixlConfig) -> Any:
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
