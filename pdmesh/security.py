"""Cluster-internal authentication shared by every pdmesh service.

Internal endpoints (worker registration, tier servers, transfer handshakes, cache server) require the cluster
token in the ``X-PDMesh-Token`` header (or the ``token`` field of a binary protocol's hello frame). The token comes
from ``PDMESH_CLUSTER_TOKEN`` or a service's config. An empty expected token means "auth disabled" and is only
accepted when the service is bound to a loopback address (callers check that with :func:`is_loopback`).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket

TOKEN_HEADER = "X-PDMesh-Token"
TOKEN_ENV = "PDMESH_CLUSTER_TOKEN"


def cluster_token_from_env() -> str:
    """The cluster token from the environment ('' when unset)."""
    return os.environ.get(TOKEN_ENV, "")


def token_matches(provided: str | None, expected: str) -> bool:
    """Constant-time comparison. With no expected token every caller matches (loopback-only deployments)."""
    if not expected:
        return True
    if provided is None:
        return False
    return hmac.compare_digest(provided.encode(), expected.encode())


def is_loopback(host: str) -> bool:
    """True when ``host`` (name or address) resolves only to loopback addresses."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def require_token_for_bind(host: str, token: str, service: str) -> None:
    """Refuse to serve internal endpoints on a non-loopback address without a cluster token."""
    if not token and not is_loopback(host):
        raise SystemExit(
            f"{service}: refusing to listen on {host} without a cluster token; set {TOKEN_ENV} "
            "(or bind to 127.0.0.1)"
        )
