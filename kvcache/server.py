"""The tier server: one process per worker node owning the node's KV memory pool, disk tier, remote client and
transfer endpoint (:class:`pdmesh.kvcache.tier.Tier`), with two faces on one asyncio loop:

* the **control socket** (unix, mode 0600) for the vLLM connector: :mod:`pdmesh.kvcache.control_ops`;
* the **HTTP API** for operators and the router: :mod:`pdmesh.kvcache.tier_http`;

and, when ``transfer.enabled``, the transfer receiver that decode nodes are pushed to (threads of
:mod:`pdmesh.transfer`). Once serving it prints one ready line on stdout (:mod:`pdmesh.kvcache.ready_line`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any

from pdmesh.http_guard import guarded_protocol
from pdmesh.kvcache.config import TierConfig
from pdmesh.kvcache.control_ops import serve_control
from pdmesh.kvcache.ready_line import format_ready_line
from pdmesh.kvcache.tier import Tier
from pdmesh.kvcache.tier_http import make_app
from pdmesh.security import require_token_for_bind

log = logging.getLogger("pdmesh.tier")


MAX_CONTROL_CONNECTIONS = 1024  # a node's engine holds a few; more is a client gone wrong


class TierServer(Tier):
    """A :class:`Tier` with its listeners. ``await start()``, then ``await wait_closed()`` or ``await close()``."""

    def __init__(self, config: TierConfig) -> None:
        super().__init__(config)
        self.socket_path = config.resolved_socket_path()
        self.http_port: int | None = None
        self._unix: asyncio.base_events.Server | None = None
        self._http = None
        self._closed = asyncio.Event()
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        require_token_for_bind(self.config.host, self.token, "pdmesh tier-server")
        await asyncio.to_thread(self._prepare_socket_path)
        self._unix = await asyncio.start_unix_server(self._serve_control, path=self.socket_path)
        os.chmod(self.socket_path, 0o600)
        await self._start_http()
        await self.start_core()

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= MAX_CONTROL_CONNECTIONS:
            log.warning("control connection refused: %d open (the cap)", len(self._conns))
            writer.close()
            return
        self._conns.add(writer)
        try:
            await serve_control(self, reader, writer)
        finally:
            self._conns.discard(writer)

    def _prepare_socket_path(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.socket_path)), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def _start_http(self) -> None:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.http_port))
        self.http_port = sock.getsockname()[1]
        cfg = uvicorn.Config(
            make_app(self),
            log_level="warning",
            lifespan="off",
            access_log=False,
            http=guarded_protocol(header_timeout_s=5.0, max_connections=512),
        )
        self._http = uvicorn.Server(cfg)
        self._http.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._tasks.append(asyncio.create_task(self._http.serve(sockets=[sock]), name="tier-http"))
        for _ in range(200):  # bounded: up to ~2 s for uvicorn to come up
            if self._http.started:
                break
            await asyncio.sleep(0.01)

    def _http_advertise_host(self) -> str:
        """The host others use for this server's HTTP API: the transfer advertise host when the HTTP bind is a
        wildcard (containers), else the bind host."""
        host = self.config.host.strip("[]")
        if host in ("0.0.0.0", "::", "") and self.config.transfer.advertise_host:
            host = self.config.transfer.advertise_host.strip("[]")
        return f"[{host}]" if ":" in host else host

    def ready_info(self) -> dict[str, Any]:
        return {
            "socket": self.socket_path,
            "http": f"http://{self._http_advertise_host()}:{self.http_port}",
            "segment": self.pool.segment_name,
            "pid": os.getpid(),
            "transfer": self.transfer.address if self.transfer is not None else None,
        }

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        """Stop serving, drop connections, flush nothing (the tier is a cache), unlink socket and segment."""
        if self._closed.is_set():
            return
        if self._http is not None:
            self._http.should_exit = True
        if self._unix is not None:
            self._unix.close()
        for w in list(self._conns):
            w.close()
        await self.close_core()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._closed.set()


async def _amain(config: TierConfig) -> None:
    server = TierServer(config)
    try:
        await server.start()
    except BaseException:
        await server.close()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.close()))
    print(format_ready_line(server.ready_info()), flush=True)
    log.info("tier server ready: %s", server.ready_info())
    await server.wait_closed()


def run_tier_server(config: TierConfig) -> None:
    """Run a tier server in the foreground until SIGINT/SIGTERM. Prints one ready line (socket, http, segment,
    pid, transfer) on stdout once serving."""
    asyncio.run(_amain(config))
