"""Several router processes on one port (``processes: N``): a supervisor and its children.

One Python process serves the router's hot path on one core; ``processes: N`` runs N full routers that each bind
the port with SO_REUSEPORT (the kernel spreads client connections over them) plus a private unix socket for
their siblings (:mod:`router.peers`: relayed registrations, merged /metrics).

Contract of the supervisor (:func:`run_supervisor`, blocking):
- It owns a private 0700 directory (config with the secrets, mode 0600; the unix sockets) and removes it on exit.
- It starts the children, restarts a child that exits (at most once per ``_RESTART_BACKOFF_S``), and on
  SIGTERM/SIGINT stops them all (SIGTERM, 10 s grace, then SIGKILL) and returns. Children die with it
  (PR_SET_PDEATHSIG) if it is killed.
- Per-process state: admission limits are split evenly (each process enforces 1/N of every limit), breakers,
  in-flight counts and the cache-aware prefix index are per process (tier ``/lookup`` stays global).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from pdmesh.procs import ManagedProcess
from router.config import RouterConfig
from router.log_format import setup_logging
from router.peers import Peers, peer_socket_paths

log = logging.getLogger("pdmesh.router")

_RESTART_BACKOFF_S = 1.0


def share_of(config: RouterConfig, n: int) -> RouterConfig:
    """The config of one of ``n`` processes: every admission limit divided evenly (rounded up)."""
    lim = config.limits
    scaled = lim.model_copy(
        update={
            "max_concurrency": math.ceil(lim.max_concurrency / n),
            "rate_per_s": lim.rate_per_s / n,
            "burst": math.ceil(lim.burst / n),
            "per_key_max_concurrency": math.ceil(lim.per_key_max_concurrency / n),
            "per_key_rate_per_s": lim.per_key_rate_per_s / n,
            "per_key_burst": math.ceil(lim.per_key_burst / n),
        }
    )
    return config.model_copy(update={"limits": scaled})


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT (IPv4 or IPv6 by ``host``). Raises OSError if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))


def run_supervisor(config: RouterConfig) -> None:
    n = config.processes
    _port_free(config.host, config.port)
    workdir = tempfile.mkdtemp(prefix="pdmesh-router-")
    os.chmod(workdir, 0o700)
    cfg_path = Path(workdir) / "config.json"
    fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(config.model_dump_json())
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    children: dict[int, ManagedProcess] = {}
    started_at: dict[int, float] = {}

    def spawn(i: int) -> None:
        argv = [sys.executable, "-m", "router.processes", "--child", str(i), "--dir", workdir]
        children[i] = ManagedProcess(f"router-{i}", argv)
        started_at[i] = time.monotonic()

    try:
        for i in range(n):
            spawn(i)
        log.info("router: %d processes on %s:%d", n, config.host, config.port)
        while not stop.wait(0.2):
            for i, child in list(children.items()):
                if child.alive():
                    continue
                if time.monotonic() - started_at[i] < _RESTART_BACKOFF_S:
                    continue
                log.warning("router process %d exited with %s; restarting it", i, child.poll())
                child.stop(timeout=1)
                spawn(i)
    finally:
        for child in children.values():
            child.signal_group(signal.SIGTERM)
        for child in children.values():
            child.stop(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)


def run_child(index: int, workdir: str) -> None:
    """One router process: its share of the limits, the shared port, its unix socket, its siblings. Blocking."""
    from router.app import create_app

    config = RouterConfig.model_validate_json((Path(workdir) / "config.json").read_text())
    setup_logging(config.log_level, config.log_format)
    paths = peer_socket_paths(workdir, config.processes)
    own = paths[index]
    siblings = [p for i, p in enumerate(paths) if i != index]
    tcp = reuseport_socket(config.host, config.port)
    if os.path.exists(own):
        os.unlink(own)
    uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    uds.bind(own)
    os.chmod(own, 0o600)
    uds.listen(256)
    app = create_app(share_of(config, config.processes), peers=Peers(siblings, config.cluster_token))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=config.log_level,
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=5,
            proxy_headers=False,  # client addresses are not used; X-Forwarded-* is not trusted
            server_header=False,
        )
    )
    server.run(sockets=[tcp, uds])


def _main() -> int:
    ap = argparse.ArgumentParser(description="one router process (started by the router supervisor)")
    ap.add_argument("--child", type=int, required=True)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    run_child(args.child, args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
