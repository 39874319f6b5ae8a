"""Cluster-internal authentication shared by every pdmesh service.

Internal HTTP endpoints (worker registration, tier servers) require the cluster token in the ``X-PDMesh-Token``
header; the tier's local control socket and the cache server take it in their hello frame. Transfer peers, which
connect to addresses that travel in requests, never send it: both sides prove they know it with
:func:`auth_proof` over fresh nonces (challenge-response, HMAC-SHA256), so a fake peer learns nothing it can use.
The token comes from ``PDMESH_CLUSTER_TOKEN`` or a service's config. An empty expected token means "auth disabled"
and is only accepted when the service is bound to a loopback address (callers check that with
:func:`is_loopback`; ``""`` binds every interface, so it is not loopback).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
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
    if not isinstance(provided, str):
        return False
    return hmac.compare_digest(provided.encode(), expected.encode())


NONCE_BYTES = 32


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def auth_proof(token: str, label: str, *parts: bytes) -> bytes:
    """HMAC-SHA256 of ``label`` and ``parts`` keyed by the cluster token: a proof of knowing it that reveals
    nothing about it. Each side of a handshake uses its own ``label``, so one side's proof is never the other's."""
    mac = hmac.new(token.encode(), label.encode() + b"\0", hashlib.sha256)
    for p in parts:
        mac.update(len(p).to_bytes(4, "big") + p)
    return mac.digest()


def proof_matches(proof: object, token: str, label: str, *parts: bytes) -> bool:
    """Constant-time check of a peer's :func:`auth_proof` (False for anything that is not bytes)."""
    if not isinstance(proof, bytes):
        return False
    return hmac.compare_digest(proof, auth_proof(token, label, *parts))


def worker_api_key(token: str) -> str:
    """The API key every worker's vLLM server requires (``VLLM_API_KEY``), derived from the cluster token: the
    router (which holds the token) can call workers, a client that reaches a worker's port directly gets 401.
    Empty when the token is (loopback-only deployments)."""
    return auth_proof(token, "vllm-api-key").hex() if token else ""


def sign_push_target(token: str, transfer_id: str, push_to: str, deadline_ms: int) -> str:
    """The router's grant for one push: a prefill worker pushes only to an address signed for that transfer."""
    return auth_proof(
        token, "push-target", transfer_id.encode(), push_to.encode(), str(deadline_ms).encode()
    ).hex()


def push_target_signed(
    signature: object, token: str, transfer_id: str, push_to: str, deadline_ms: object
) -> bool:
    if not isinstance(signature, str) or isinstance(deadline_ms, bool) or not isinstance(deadline_ms, int):
        return False
    try:
        proof = bytes.fromhex(signature)
        parts = (transfer_id.encode(), push_to.encode(), str(deadline_ms).encode())
    except ValueError:  # also UnicodeEncodeError (a lone surrogate): never raise inside vLLM's scheduler
        return False
    return proof_matches(proof, token, "push-target", *parts)


def is_loopback(host: str) -> bool:
    """True when ``host`` (name or address) resolves only to loopback addresses ("" is every interface)."""
    if host == "localhost":
        return True
    if host in ("", "*"):
        return False
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
