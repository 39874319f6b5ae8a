"""Authentication dependencies: public API keys and the cluster token for internal endpoints.

Client-supplied headers are never trusted for anything but these checks; internal routing data travels only
in the router's own legs to workers.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from pdmesh.security import TOKEN_HEADER, token_matches
from router.errors import OpenAIError


def check_api_key(request: Request, api_keys: list[str]) -> None:
    """Raise 401 unless auth is off or ``Authorization: Bearer <key>`` names a configured key."""
    if not api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise OpenAIError(401, "missing API key (Authorization: Bearer <key>)", code="invalid_api_key")
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in api_keys):
        raise OpenAIError(401, "invalid API key", code="invalid_api_key")


def check_cluster_token(request: Request, token: str) -> None:
    """Raise 403 unless the request carries the cluster token (internal endpoints)."""
    if not token_matches(request.headers.get(TOKEN_HEADER), token):
        raise OpenAIError(403, f"internal endpoint: missing or wrong {TOKEN_HEADER}", code="forbidden")
