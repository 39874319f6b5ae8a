"""The tier server's HTTP API, for operators and the router.

- ``GET /health`` (no token): ``{status, segment, remote_up}``.
- ``GET /metrics`` (no token): Prometheus text (:mod:`pdmesh.kvcache.metrics`).
- ``GET /stats``: the tier's counters (:meth:`pdmesh.kvcache.tier.Tier.stats`).
- ``POST /lookup``: ``{"keys": [hex]}`` or ``{"token_ids": [...], "fingerprint"?: {...}, "chunk_tokens"?: int,
  "salt"?: str, "remote"?: bool}`` (``salt``: the request's ``cache_salt``, which keys its chunks) -> ``{chunks, tokens, total_chunks, tiers}``: how much of a prompt the tier holds (the
  router's cache-aware choice uses it).
- ``POST /clear``: ``{"tiers": ["memory", "disk", "remote"]}`` -> ``{cleared}``.

``/stats``, ``/lookup`` and ``/clear`` need the cluster token in ``X-PDMesh-Token``. The token is checked before
the body is read, and a body is read only up to :data:`MAX_BODY_BYTES` (413 past it), so an unauthenticated
client costs a header parse and nothing more.

The tier's event loop also serves the connector's control socket, so a request's CPU work never runs on it:
``/lookup`` parses a large body and derives the keys of its token ids (up to ~1M ids: a second of hashing at
``chunk_tokens=1``) in a worker thread, at most :data:`LOOKUP_THREADS` at once, and refuses (422) a lookup of
more than :data:`MAX_LOOKUP_KEYS` keys before hashing anything.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdmesh.kvcache.keys import InputIdentity, ModelFingerprint, chain_keys, every_shard_keys, key_from_hex
from pdmesh.kvcache.metrics import render
from pdmesh.security import TOKEN_HEADER, token_matches

if TYPE_CHECKING:
    from pdmesh.kvcache.tier import Tier

MAX_BODY_BYTES = 4 << 20  # a 128k-token prompt as JSON token ids is ~1 MB
MAX_LOOKUP_KEYS = 1 << 20  # keys one /lookup may ask about (chunks x shards): bounds its work
LOOKUP_THREADS = 2  # /lookup key derivations running at once (worker threads); more wait their turn
PARSE_INLINE_BYTES = 64 << 10  # a larger JSON body is parsed in a worker thread


class _HTTPError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _require_token(tier: Tier, request: Request) -> None:
    if not token_matches(request.headers.get(TOKEN_HEADER), tier.token):
        raise _HTTPError(401, "missing or bad cluster token")


async def _authed_body(tier: Tier, request: Request) -> dict[str, Any]:
    """Check the token, then read and parse a bounded JSON object body ({} when empty)."""
    _require_token(tier, request)
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise _HTTPError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    buf = bytearray()
    async for part in request.stream():
        buf += part
        if len(buf) > MAX_BODY_BYTES:
            raise _HTTPError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    if not buf:
        return {}
    try:
        body = json.loads(buf) if len(buf) <= PARSE_INLINE_BYTES else await asyncio.to_thread(json.loads, buf)
    except (ValueError, RecursionError) as e:
        raise _HTTPError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _HTTPError(400, "body must be a JSON object")
    return body


def _lookup_keys(tier: Tier, body: dict[str, Any]) -> tuple[list[bytes], list[bytes], int, int]:
    """The chunk keys a ``/lookup`` body asks about, the keys to look up (every shard's part of each), the number
    of shards and the chunk size in tokens. CPU-bound (hashes the token ids): called in a worker thread. Raises
    :class:`_HTTPError` (422) for a bad body or more than :data:`MAX_LOOKUP_KEYS` keys, checked before hashing."""
    try:
        chunk_tokens = int(body.get("chunk_tokens") or tier.engine_chunk_tokens or tier.config.chunk_tokens)
        if chunk_tokens <= 0:
            raise ValueError("chunk_tokens must be positive")
        shards = 1
        if "keys" in body:
            _bound(len(body["keys"]), shards)
            keys = [key_from_hex(k) for k in body["keys"]]
        elif "token_ids" in body:
            fp = body.get("fingerprint")
            if fp is not None:
                model = ModelFingerprint.from_dict(fp)
            elif tier.fingerprint is not None:
                model = tier.fingerprint
            else:
                raise _HTTPError(422, "no fingerprint: pass one or configure the tier's fingerprint")
            shards = model.shards
            salt = body.get("salt", "")
            if not isinstance(salt, str):
                raise ValueError("salt must be a string")
            token_ids = body["token_ids"]
            _bound(len(token_ids) // chunk_tokens, shards)
            keys = chain_keys(model.digest(), token_ids, chunk_tokens, InputIdentity(salt=salt))
        else:
            raise _HTTPError(422, "body needs 'keys' (hex) or 'token_ids'")
        # a sharded engine's chunk is there when every shard's part is (pdmesh.kvcache.keys.every_shard_keys)
        return keys, every_shard_keys(keys, shards), shards, chunk_tokens
    except (ValueError, TypeError, AttributeError, OverflowError) as e:
        raise _HTTPError(422, str(e)) from e


def _bound(chunks: int, shards: int) -> None:
    if chunks * shards > MAX_LOOKUP_KEYS:
        raise ValueError(f"{chunks} chunks x {shards} shards: more than {MAX_LOOKUP_KEYS} keys")


def make_app(tier: Tier) -> FastAPI:
    app = FastAPI(title="pdmesh tier server", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(_HTTPError)
    async def _error(request: Request, exc: _HTTPError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "segment": tier.pool.segment_name,
            "remote_up": None if tier.remote is None else tier.remote.available,
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(tier.registry), media_type="text/plain; version=0.0.4")

    @app.get("/stats")
    async def stats(request: Request) -> dict:
        _require_token(tier, request)
        return tier.stats()

    hashing = asyncio.Semaphore(LOOKUP_THREADS)

    @app.post("/lookup")
    async def lookup(request: Request) -> dict:
        body = await _authed_body(tier, request)
        async with hashing:
            keys, parts, shards, chunk_tokens = await asyncio.to_thread(_lookup_keys, tier, body)
        n, tiers = await tier.lookup(parts, bool(body.get("remote", True)))
        n //= shards
        return {
            "chunks": n,
            "tokens": n * chunk_tokens,
            "total_chunks": len(keys),
            "tiers": tiers[::shards][:n],
        }

    @app.post("/clear")
    async def clear(request: Request) -> dict:
        body = await _authed_body(tier, request)
        tiers = body.get("tiers") or ["memory", "disk"]
        if not isinstance(tiers, list) or not all(isinstance(t, str) for t in tiers):
            raise _HTTPError(422, "tiers must be a list of tier names")
        return {"cleared": await tier.clear_async(tiers)}

    return app
