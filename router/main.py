"""Run the router with uvicorn (``pdmesh router``)."""

from __future__ import annotations

import logging

import uvicorn

from pdmesh.security import require_token_for_bind
from router.app import create_app
from router.config import RouterConfig


def run_router(config: RouterConfig) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both and runs the lifespan shutdown). Blocking."""
    require_token_for_bind(config.host, config.cluster_token, "router")
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
