"""Authentication dependencies: public API keys and the cluster token for internal endpoints.

Client-supplied headers are never trusted for anything but these checks; internal routing data travels only
in the router's own legs to workers.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from pdmesh.router.errors import OpenAIError
from pdmesh.security import TOKEN_HEADER, token_matches


def check_api_key(request: Request, api_keys: list[str]) -> str:
    """Raise 401 unless auth is off or ``Authorization: Bearer <key>`` names a configured key.

    Returns the key (the identity for per-key limits), or ``""`` when auth is off.
    """
    return api_key_of(request.headers.get("authorization"), api_keys)


def api_key_of(authorization: str | None, api_keys: list[str]) -> str:
    """:func:`check_api_key` on the raw ``Authorization`` header value (None when absent)."""
    if not api_keys:
        return ""
    header = authorization or ""
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise OpenAIError(401, "missing API key (Authorization: Bearer <key>)", code="invalid_api_key")
    # Compare against every key (no early exit) so timing does not reveal which prefix matched.
    matched = [k for k in api_keys if hmac.compare_digest(key.encode(), k.encode())]
    if not matched:
        raise OpenAIError(401, "invalid API key", code="invalid_api_key")
    return matched[0]


def check_cluster_token(request: Request, token: str) -> None:
    """Raise 403 unless the request carries the cluster token (internal endpoints)."""
    if not token_matches(request.headers.get(TOKEN_HEADER), token):
        raise OpenAIError(403, f"internal endpoint: missing or wrong {TOKEN_HEADER}", code="forbidden")
