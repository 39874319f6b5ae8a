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
import time

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


# A push grant's expiry is absolute (unix ms): its deadline plus this margin for clock skew between router and
# workers; a grant that claims to live longer than MAX_GRANT_MS from now is refused as well.
PUSH_GRANT_SKEW_MS = 5_000
MAX_GRANT_MS = 600_000 + 2 * PUSH_GRANT_SKEW_MS
PUSH_KIND = "push-target"  # the signature over push_to
PUSH_DEVICE_KIND = "push-target-device"  # the signature over push_to_device


def prompt_digest(token_ids) -> str:
    """A digest (hex) of a prompt's token ids, which a push grant binds to. ValueError for an id outside uint32."""
    import struct

    try:
        raw = struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error as e:
        raise ValueError("token id out of range") from e
    return hashlib.blake2b(raw, digest_size=16, person=b"pdmesh-prompt").hexdigest()


def _grant_parts(grant: dict, address: str) -> tuple[bytes, ...]:
    return tuple(
        str(v).encode()
        for v in (
            grant["transfer_id"],
            address,
            grant["deadline_ms"],
            grant["expires_ms"],
            grant["nonce"],
            grant.get("prompt", ""),
        )
    )


def push_grant(
    token: str,
    transfer_id: str,
    push_to: str,
    deadline_ms: int,
    prompt: str | None = None,
    push_to_device: str | None = None,
    now_ms: int | None = None,
) -> dict:
    """The router's grant for one prefill leg's pushes: ``{transfer_id, push_to, deadline_ms, expires_ms, nonce,
    prompt?, sig, push_to_device?, sig_device?}``. ``sig`` (label :data:`PUSH_KIND`) and ``sig_device`` (label
    :data:`PUSH_DEVICE_KIND`) are HMACs keyed by the cluster token over the transfer id, the address, the deadline,
    the absolute expiry, a fresh nonce (so every grant is used once: :class:`pdmesh.connector.params.SeenGrants`)
    and ``prompt`` (:func:`prompt_digest` of the prompt's token ids, when the router knows them)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    grant: dict = {
        "transfer_id": transfer_id,
        "push_to": push_to,
        "deadline_ms": int(deadline_ms),
        "expires_ms": now + int(deadline_ms) + PUSH_GRANT_SKEW_MS,
        "nonce": secrets.token_hex(12),
    }
    if prompt is not None:
        grant["prompt"] = prompt
    grant["sig"] = auth_proof(token, PUSH_KIND, *_grant_parts(grant, push_to)).hex()
    if push_to_device:
        grant["push_to_device"] = push_to_device
        grant["sig_device"] = auth_proof(token, PUSH_DEVICE_KIND, *_grant_parts(grant, push_to_device)).hex()
    return grant


def push_grant_refusal(
    grant: dict, token: str, kind: str, prompt_ids=None, now_ms: int | None = None
) -> str | None:
    """Why a prefill worker must not honour ``grant`` for ``kind`` (``None``: it may). Checks the signature
    (constant time), the expiry (with :data:`PUSH_GRANT_SKEW_MS` of skew either way) and, when the grant is bound
    to a prompt, that ``prompt_ids`` are that prompt. Never raises (the grant is untrusted input)."""
    address = grant.get("push_to" if kind == PUSH_KIND else "push_to_device")
    sig = grant.get("sig" if kind == PUSH_KIND else "sig_device")
    expires, deadline = grant.get("expires_ms"), grant.get("deadline_ms")
    if not (
        isinstance(address, str)
        and isinstance(sig, str)
        and isinstance(grant.get("transfer_id"), str)
        and isinstance(grant.get("nonce"), str)
        and isinstance(grant.get("prompt", ""), str)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in (expires, deadline))
    ):
        return "unsigned or malformed"
    try:
        proof = bytes.fromhex(sig)
        parts = _grant_parts(grant, address)
    except (ValueError, UnicodeError):  # also a lone surrogate: never raise inside vLLM's scheduler
        return "unsigned or malformed"
    if not proof_matches(proof, token, kind, *parts):
        return "bad signature"
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if now > expires + PUSH_GRANT_SKEW_MS:
        return "expired"
    if expires - now > MAX_GRANT_MS:
        return "expiry too far ahead"
    if "prompt" in grant:
        try:
            if prompt_ids is None or prompt_digest(prompt_ids) != grant["prompt"]:
                return "granted for another prompt"
        except ValueError:
            return "granted for another prompt"
    return None


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
