"""Run the router with uvicorn (``pdmesh router``)."""

from __future__ import annotations

import uvicorn

from pdmesh.http_guard import guarded_protocol
from pdmesh.router.app import create_app
from pdmesh.router.config import RouterConfig
from pdmesh.router.log_format import setup_logging
from pdmesh.router.processes import run_supervisor
from pdmesh.security import require_token_for_bind


def run_router(config: RouterConfig) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both and runs the lifespan shutdown). Blocking.

    With ``processes > 1`` this process supervises that many router processes (:mod:`router.processes`).
    """
    require_token_for_bind(config.host, config.cluster_token, "router")
    setup_logging(config.log_level, config.log_format)
    if config.processes > 1:
        if run_supervisor(config):
            raise SystemExit(1)
        return
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        log_config=None,  # keep our handlers (JSON or text)
        timeout_graceful_shutdown=5,
        proxy_headers=False,  # client addresses are not used; X-Forwarded-* is not trusted
        server_header=False,
        http=guarded_protocol(config.header_timeout_s, config.max_connections, config.max_head_bytes),
    )
