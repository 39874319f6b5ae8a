"""Several router processes on one port (``processes: N``): a supervisor and its children.

One Python process serves the router's hot path on one core; ``processes: N`` runs N full routers that each bind
the port with SO_REUSEPORT (the kernel spreads client connections over them) plus a private unix socket for
their siblings (:mod:`router.peers`: relayed registrations, merged /metrics).

Contract of the supervisor (:func:`run_supervisor`, blocking):
- It owns a private 0700 directory (the unix sockets) and removes it on exit; the config, secrets included,
  reaches the children in their environment (readable by this user only), never in a file.
- It starts the children and restarts a child that exits (:data:`ROUTER_RESTART_POLICY` of
  :mod:`pdmesh.restart_policy`: at once after a child that ran 10 s or more, backoff doubling from 1 s while
  a child fails right after its start; after 5 such failures in a row it stops everything and returns 1;
  each exit is logged, saying that the child's output is in the supervisor's own), and on
  SIGTERM/SIGINT/SIGHUP stops them all (SIGTERM, 10 s grace, then SIGKILL) and returns 0. Children die with
  it (PR_SET_PDEATHSIG) if it is killed.
- Per-process state: admission limits are split evenly (each process enforces 1/N of every limit), breakers,
  in-flight counts and the cache-aware prefix index are per process (tier ``/lookup`` stays global).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

import uvicorn

from pdmesh.http_guard import guarded_protocol
from pdmesh.procs import ManagedProcess
from pdmesh.restart_policy import CrashLoop, RestartPolicy, RestartTracker
from pdmesh.router.config import RouterConfig, RouterConfigError
from pdmesh.router.log_format import setup_logging
from pdmesh.router.peers import Peers, peer_socket_paths

log = logging.getLogger("pdmesh.router")

# A router process that exits sooner than 10 s after its start failed right after starting: restarts back off
# 1, 2, 4, 8 s and the 5th such failure in a row stops everything. One that ran longer is restarted at once.
ROUTER_RESTART_POLICY = RestartPolicy(
    first_delay_s=1.0, max_delay_s=30.0, factor=2.0, max_exits=None, max_failed_starts=4, quick_s=10.0
)
# Children write to the supervisor's own stdout/stderr: there is no file of theirs to quote when one dies.
_NO_LOG_FILE = "It has no log file of its own: its last lines are in this process's output above."
CONFIG_ENV = "PDMESH_ROUTER_PROCESS_CONFIG"
_MAX_ENV_CONFIG = 120 * 1024


def share_of(config: RouterConfig, n: int) -> RouterConfig:
    """The config of one of ``n`` processes: every admission limit divided evenly.

    Counts are rounded down but stay >= 1 when set (0 means "no limit"), so the processes together never
    admit more than the configured limit unless it is smaller than ``n``.
    """
    lim = config.limits

    def part(count: int) -> int:
        return max(1, count // n) if count else 0

    scaled = lim.model_copy(
        update={
            "max_concurrency": part(lim.max_concurrency),
            "rate_per_s": lim.rate_per_s / n,
            "burst": part(lim.burst),
            "per_key_max_concurrency": part(lim.per_key_max_concurrency),
            "per_key_rate_per_s": lim.per_key_rate_per_s / n,
            "per_key_burst": part(lim.per_key_burst),
        }
    )
    return config.model_copy(update={"limits": scaled})


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT (IPv4 or IPv6 by ``host``). Raises OSError if the port is taken."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def _port_free(host: str, port: int) -> None:
    """Raise OSError if something else already listens on the port (SO_REUSEPORT would share it silently)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))


def run_supervisor(config: RouterConfig) -> int:
    """Run ``config.processes`` router processes until SIGTERM/SIGINT/SIGHUP (returns 0) or until a process
    keeps failing right after its start (:data:`ROUTER_RESTART_POLICY`'s crash-loop rule: returns 1). Blocking."""
    n = config.processes
    _port_free(config.host, config.port)
    # The config (with the API keys and the cluster token) goes to the children in their environment, which
    # only this user can read, rather than in a file that a SIGKILL would leave behind.
    env = {**os.environ, CONFIG_ENV: config.model_dump_json()}
    if len(env[CONFIG_ENV]) > _MAX_ENV_CONFIG:  # one environment string is limited to 128 KiB on Linux
        raise RouterConfigError(
            f"router config too large to hand to {n} processes ({len(env[CONFIG_ENV])} bytes; the limit is "
            f"{_MAX_ENV_CONFIG}): fewer api_keys, or processes: 1"
        )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    stop_signals = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # keep nohup's "ignore hang-ups"
        stop_signals.append(signal.SIGHUP)
    old = {s: signal.signal(s, on_signal) for s in stop_signals}
    workdir = tempfile.mkdtemp(prefix="pdmesh-router-")  # 0700; holds the unix sockets only
    children: dict[int, ManagedProcess] = {}
    trackers = {i: RestartTracker(ROUTER_RESTART_POLICY, name=f"router process {i}") for i in range(n)}
    dead: set[int] = set()  # processes seen dead, waiting for their restart to be due
    status = 0

    def spawn(i: int, restart: bool = False) -> None:
        argv = [sys.executable, "-m", "pdmesh.router.processes", "--child", str(i), "--dir", workdir]
        if restart:  # its siblings know the registered workers: copy them before serving
            argv.append("--copy-registry")
        children[i] = ManagedProcess(f"router-{i}", argv, env=env)
        trackers[i].started()

    try:
        for i in range(n):
            spawn(i)
        log.info("router: %d processes on %s:%d", n, config.host, config.port)
        while not stop.wait(0.2):
            for i, child in list(children.items()):
                if child.alive():
                    continue
                if i not in dead:  # first seen dead: judge the exit once
                    dead.add(i)
                    try:
                        delay = trackers[i].exited(f"exit {child.poll()}")
                    except CrashLoop as e:
                        log.error("%s: stopping every process. %s", e, _NO_LOG_FILE)
                        status = 1
                        stop.set()
                        break
                    log.warning(
                        "router process %d exited with %s; restarting it in %.0fs. %s",
                        i,
                        child.poll(),
                        delay,
                        _NO_LOG_FILE,
                    )
                if not trackers[i].due():
                    continue
                dead.discard(i)
                child.stop(timeout=1)
                spawn(i, restart=True)
    finally:
        for child in children.values():
            child.signal_group(signal.SIGTERM)
        for child in children.values():
            child.stop(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
    return status


def run_child(index: int, workdir: str, copy_registry: bool = False) -> None:
    """One router process: its share of the limits, the shared port, its unix socket, its siblings. Blocking."""
    from pdmesh.router.app import create_app

    config = RouterConfig.model_validate_json(os.environ.pop(CONFIG_ENV))
    setup_logging(config.log_level, config.log_format)
    paths = peer_socket_paths(workdir, config.processes)
    own = paths[index]
    siblings = {i: p for i, p in enumerate(paths) if i != index}
    tcp = reuseport_socket(config.host, config.port)
    if os.path.exists(own):
        os.unlink(own)
    uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    uds.bind(own)
    os.chmod(own, 0o600)
    uds.listen(256)
    app = create_app(
        share_of(config, config.processes),
        peers=Peers(index, siblings, config.cluster_token, copy_registry=copy_registry),
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=config.log_level,
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=5,
            proxy_headers=False,  # client addresses are not used; X-Forwarded-* is not trusted
            server_header=False,
            http=guarded_protocol(config.header_timeout_s, config.max_connections, config.max_head_bytes),
        )
    )
    server.run(sockets=[tcp, uds])


def _main() -> int:
    ap = argparse.ArgumentParser(description="one router process (started by the router supervisor)")
    ap.add_argument("--child", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument(
        "--copy-registry", action="store_true", help="copy registered workers from a sibling first"
    )
    args = ap.parse_args()
    run_child(args.child, args.dir, args.copy_registry)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
