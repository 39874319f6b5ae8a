"""Helpers for tests: serve an ASGI app with uvicorn on a free 127.0.0.1 port in a background thread."""

from __future__ import annotations

import threading
import time

import uvicorn

from pdmesh.procs import free_port


class ThreadServer:
    """Owns a uvicorn server thread; ``stop()`` (idempotent) shuts it down within a few seconds."""

    def __init__(self, app, port: int | None = None, host: str = "127.0.0.1", **uvicorn_options) -> None:
        """``host``: a loopback address to bind (127.0.0.2 stands for a second machine's router in name tests).
        ``uvicorn_options``: extra ``uvicorn.Config`` arguments (e.g. ``ssl_certfile``/``ssl_keyfile``:
        the server then speaks https and ``url`` names localhost, the certificate's name)."""
        self.port = port or free_port(host)
        tls = "ssl_certfile" in uvicorn_options
        self.url = f"https://localhost:{self.port}" if tls else f"http://{host}:{self.port}"
        config = uvicorn.Config(
            app, host=host, port=self.port, log_level="warning", lifespan="on", **uvicorn_options
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 10.0) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
