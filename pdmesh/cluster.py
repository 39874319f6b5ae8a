"""A local pdmesh cluster on 127.0.0.1: router + N prefill + M decode workers (``pdmesh up``).

:class:`LocalCluster` owns every process it starts; :meth:`LocalCluster.stop` (idempotent, also run by the
context manager) stops them all, workers first so they deregister. Children also die with this process
(PR_SET_PDEATHSIG), so no orphan survives even a SIGKILL of the owner. :meth:`LocalCluster.supervise` restarts
a child that exited, with its command, port and log, under :data:`CLUSTER_RESTART_POLICY` (backoff while it keeps
failing right after its start), and gives up (:class:`~pdmesh.restart_policy.CrashLoop`, a RuntimeError) on a
crash loop.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pdmesh.procs import ManagedProcess, free_port
from pdmesh.restart_policy import RestartPolicy, RestartTracker, log_tail
from pdmesh.worker.shm_leftovers import remove_orphans, segments_of

log = logging.getLogger("pdmesh.cluster")


@dataclass
class ClusterSpec:
    model: str | None = None  # None: the embedded tiny model
    served_model_name: str | None = None
    prefillers: int = 1
    decoders: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    pd_mode: str = "push"
    vllm_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # extra env for every process
    log_dir: str | None = None  # per-process logs; default: a temp dir
    startup_timeout: float = 600.0
    pin_cores: bool = True  # bind each engine's OpenMP threads to one core (pdmesh.placement)
    cache_server: bool = False  # push mode: a shared remote tier (pdmesh cache-server) for every node's tier
    router_processes: int = 1  # router processes sharing the port (router ``processes``)


MAX_RESTARTS = 5  # exits of one child within RESTART_WINDOW_S before `pdmesh up` gives up
RESTART_WINDOW_S = 60.0
# A child that exits is restarted at once the first time; while it keeps exiting within a minute of its start
# the restarts wait 1, 2, 4 ... 30 s. More than MAX_RESTARTS exits of one child within RESTART_WINDOW_S is a
# crash loop: `pdmesh up` stops, quoting the child's last log lines.
CLUSTER_RESTART_POLICY = RestartPolicy(
    first_delay_s=1.0,
    max_delay_s=30.0,
    factor=2.0,
    at_once=1,
    max_exits=MAX_RESTARTS,
    window_s=RESTART_WINDOW_S,
    quick_s=RESTART_WINDOW_S,
)
_LOG_LINES = 30  # of a dead child's log, quoted


class LocalCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.log_dir = Path(spec.log_dir or tempfile.mkdtemp(prefix="pdmesh-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.router: ManagedProcess | None = None
        self.cache_server: ManagedProcess | None = None
        self.cache_server_url: str | None = None
        self.workers: dict[str, ManagedProcess] = {}
        self.worker_ports: dict[str, int] = {}
        self.url = f"http://{spec.host}:{spec.port}"
        self._n_started = 0
        self._spawned: dict[str, tuple[list[str], Path, dict[str, str] | None]] = {}  # name -> how to restart
        self._restarts: dict[str, RestartTracker] = {}  # name -> its restart state (CLUSTER_RESTART_POLICY)
        self._dead: set[str] = set()  # children seen dead, waiting for their restart to be due

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        """Start the router and all workers; blocks until the router sees them all healthy."""
        from pdmesh.modelgen import ensure_default_model

        if self.spec.model is None:
            ensure_default_model()  # build once here instead of racing in every worker
        try:
            self.router = self._spawn(
                "router",
                [
                    "router",
                    "--host",
                    self.spec.host,
                    "--port",
                    str(self.spec.port),
                    "--pd-mode",
                    self.spec.pd_mode,
                    "--processes",
                    str(self.spec.router_processes),
                ],
                self.log_dir / "router.log",
            )
            self.wait_router(60)
            if self.spec.cache_server:
                self._start_cache_server()
            for _ in range(self.spec.prefillers):
                self.add_worker("prefill")
            for _ in range(self.spec.decoders):
                self.add_worker("decode")
            self.wait_ready(self.spec.prefillers, self.spec.decoders, self.spec.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_cache_server(self) -> None:
        import socket

        port = free_port(self.spec.host)
        self.cache_server = self._spawn(
            "cache-server",
            ["cache-server", "--host", self.spec.host, "--port", str(port)],
            self.log_dir / "cache-server.log",
        )
        deadline = time.monotonic() + 30
        while True:
            self._check_alive()
            try:
                socket.create_connection((self.spec.host, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("cache server did not start") from None
                time.sleep(0.2)
        self.cache_server_url = f"pdmesh://{self.spec.host}:{port}"

    def tier_info(self, worker: str) -> dict:
        """The ready line of a push-mode worker's tier server: socket, http, segment, pid, transfer."""
        from pdmesh.worker.tier_process import read_ready_info, tier_log_path

        info = read_ready_info(tier_log_path(self.log_dir, worker))
        if info is None:
            raise LookupError(f"no tier server ready line for {worker}")
        return info

    def add_worker(self, role: str, env: dict[str, str] | None = None) -> str:
        """Start one more worker of ``role`` (``env``: extra environment for it alone, over the cluster's);
        returns its name (e.g. ``decode-1``). Does not wait."""
        idx = sum(1 for n in self.workers if n.startswith(role))
        name = f"{role}-{idx}"
        port = free_port(self.spec.host)
        cmd = "prefiller" if role == "prefill" else "decoder"
        argv = [cmd, "--router", self.url, "--host", self.spec.host, "--port", str(port), "--worker-id", name]
        argv += ["--tier-http-port", str(free_port(self.spec.host))]
        argv += ["--pd-mode", self.spec.pd_mode]
        if self.spec.model:
            argv += ["--model", self.spec.model]
        if self.spec.served_model_name:
            argv += ["--served-model-name", self.spec.served_model_name]
        own = env
        env = {}
        if self.cache_server_url:
            env["PDMESH_TIER_REMOTE_URL"] = self.cache_server_url
        if self.spec.pin_cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(self._core_for(role, idx))
        env.update(own or {})
        self._n_started += 1
        if self.spec.vllm_args:
            argv += ["--", *self.spec.vllm_args]
        self.workers[name] = self._spawn(name, argv, self.log_dir / f"{name}.log", env)
        self.worker_ports[name] = port
        return name

    def _core_for(self, role: str, idx: int) -> int:
        """The planned core of the ``idx``-th worker of ``role`` (:mod:`pdmesh.placement`); workers beyond the
        spec's counts go round robin."""
        from pdmesh.placement import core_plan

        cores = os.cpu_count() or 1
        prefill, decode = core_plan(self.spec.prefillers, self.spec.decoders, cores)
        planned = prefill if role == "prefill" else decode
        return planned[idx] if idx < len(planned) else self._n_started % cores

    def kill_worker(self, name: str, sig: int = 9) -> None:
        """Send ``sig`` to every process of a worker (agent, vLLM and its engine), e.g. to simulate a crash.

        vLLM runs in its own session, so the agent's process group alone does not cover it: the tree is walked.
        """
        import psutil

        proc = self.workers.pop(name)
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        segments = segments_of(p.pid for p in tree)
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        proc.stop(10)
        if sig == signal.SIGKILL:  # nothing of the tree could unlink its shared memory: do it for them
            psutil.wait_procs(tree, timeout=10)
            remove_orphans(segments)

    def stop(self) -> None:
        """Stop workers (they deregister), then the router. Blocking; idempotent."""
        for name in list(self.workers):
            self.workers.pop(name).stop(30)
        if self.router is not None:
            self.router.stop(10)
            self.router = None
        if self.cache_server is not None:
            self.cache_server.stop(10)
            self.cache_server = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- waiting -----------------------------------------------------------------------------------------
    def wait_router(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                httpx.get(self.url + "/health", timeout=1.0, trust_env=False)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(f"router did not start within {timeout:.0f}s (log: {self.log_dir / 'router.log'})")

    def wait_ready(self, prefillers: int, decoders: int, timeout: float) -> None:
        """Block until the router reports at least this many healthy workers of each role."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                last = httpx.get(self.url + "/health", timeout=2.0, trust_env=False).json()
                if last.get("prefill_workers", 0) >= prefillers and last.get("decode_workers", 0) >= decoders:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"cluster not ready after {timeout:.0f}s: {last} (logs in {self.log_dir})")

    def supervise(self) -> list[str]:
        """Restart every child that exited, with the same command, port and log, once its restart is due under
        :data:`CLUSTER_RESTART_POLICY` (``pdmesh up`` calls this every second; a child waiting out its backoff
        stays dead meanwhile). Returns the names restarted. A child's exit is logged with its last log lines when
        first seen (and what was left of its process group is stopped then). Raises
        :class:`~pdmesh.restart_policy.CrashLoop` (a RuntimeError), naming the child and quoting its last log
        lines, when one exits more than ``MAX_RESTARTS`` times within ``RESTART_WINDOW_S`` (a crash loop, not
        a crash). Call it from the thread that owns the cluster (``pdmesh up``: the main thread): a child's
        death signal follows the thread that spawned it."""
        restarted = []
        for name, proc in self._children():
            if proc.alive():
                continue
            tracker = self._restarts[name]
            if name not in self._dead:  # first seen dead: judge the exit once
                code = proc.poll()
                tail = log_tail(self._spawned[name][1], _LOG_LINES)
                delay = tracker.exited(f"last code {code}", last_log=tail)  # CrashLoop on a crash loop
                log.warning(
                    "%s exited with code %s; restarting it in %.0fs. Its last log lines:\n%s",
                    name,
                    code,
                    delay,
                    tail,
                )
                proc.stop(10)  # reap it and whatever of its process group is left (e.g. a worker's vLLM)
                self._dead.add(name)
            if not tracker.due():
                continue
            args, log_path, env = self._spawned[name]
            new = self._spawn(name, args, log_path, env)
            if name == "router":
                self.router = new
            elif name == "cache-server":
                self.cache_server = new
            else:
                self.workers[name] = new
            restarted.append(name)
        return restarted

    def _children(self) -> list[tuple[str, ManagedProcess]]:
        named = [("router", self.router), ("cache-server", self.cache_server), *self.workers.items()]
        return [(n, p) for n, p in named if p is not None]

    def _check_alive(self) -> None:
        for name, proc in self._children():
            if not proc.alive():
                tail = log_tail(self.log_dir / f"{name}.log", _LOG_LINES)
                raise RuntimeError(f"{name} exited with code {proc.poll()}; last log lines:\n{tail}")

    def _spawn(
        self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        # Everything is on loopback: keep UCX (NIXL) off the real NICs unless the user says otherwise.
        full_env = {
            "UCX_NET_DEVICES": "lo",
            "PDMESH_RUN_DIR": str(self.log_dir),
            **os.environ,
            **self.spec.env,
            **(env or {}),
        }
        self._spawned[name] = (args, log_path, env)
        proc = ManagedProcess(
            name, [sys.executable, "-m", "pdmesh.cli", *args], env=full_env, log_path=str(log_path)
        )
        self._dead.discard(name)
        self._restarts.setdefault(name, RestartTracker(CLUSTER_RESTART_POLICY, name=name)).started()
        return proc
