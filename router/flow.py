"""One client request end to end: admission, validation, worker choice, PD legs, relay.

Order: API key (401) -> admission limits for one unit (429) -> body (413/408/400) -> sequences asked for
(prompts x ``n``: 400 past ``max_batch_parts`` or the limits' capacity; the rest of them admitted, 429) -> model
(404/503) -> prompt analysis (only when a policy or conditional disaggregation needs it) -> legs -> response.
Every unit of the permit is held until the response (its stream included) is finished. The legs run under the
request deadline (``request_deadline_s``: 504 ``PD_DEADLINE_EXCEEDED`` before the first byte, an error event after)
and under a disconnect watch (:meth:`router.exchange.Exchange.watched`) for the whole exchange: when the client
goes away, the running leg or stream relay is cancelled, which closes its upstream connection (vLLM aborts the
request).
The completion routes run on raw ASGI (:mod:`router.exchange`), not Starlette, because they are the hot path.

Modes: push PD (pdmesh connector: prefill pushes KV to the chosen decoder's tier), stock NIXL PD (pull), and
decode-only (conditional disaggregation, no transfer address, or no prefill worker answering).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable

import msgspec

from pdmesh.router.auth import api_key_of
from pdmesh.router.batch import StreamMerger, gather_parts, merge_responses, merged_stream
from pdmesh.router.config import RouterConfig
from pdmesh.router.deciders import PDQuestion
from pdmesh.router.errors import OpenAIError, sse_error_event
from pdmesh.router.exchange import ClientGone, Exchange, read_within
from pdmesh.router.legs import Legs
from pdmesh.router.limits import Permit
from pdmesh.router.openai_requests import (
    Kind,
    batched_prompts,
    check_parts,
    parse_request,
)
from pdmesh.router.policies import Policy
from pdmesh.router.policies.cache_aware import cached_prefix_tokens
from pdmesh.router.registry import Worker
from pdmesh.router.route_context import RouteContext
from pdmesh.router.state import RouterState
from pdmesh.router.tier_lookup import lookup_all
from pdmesh.router.ttft_breakdown import Marks, observe
from pdmesh.router.upstream import LegResult

log = logging.getLogger("pdmesh.router")

PATHS: dict[Kind, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


async def serve(st: RouterState, ex: Exchange, kind: Kind) -> None:
    """Serve one completion request on ``ex`` (never raises for the client's or a worker's faults).

    Errors before the first byte become OpenAI error bodies; after it, the stream ends with an error event.
    The admission permit (one unit per sequence asked for: prompts x ``n``) is held until the response, stream
    included, is finished.
    """
    started = time.perf_counter()
    endpoint = PATHS[kind]
    request_id = st.request_ids.next()
    status = "200"
    permit: Permit | None = None
    ctx: RouteContext | None = None
    try:
        key = api_key_of(ex.header(b"authorization"), st.config.api_keys)
        if st.limiter.enabled:
            permit = st.limiter.admit(key)
        raw = await read_within(ex.read_body(st.config.max_body_bytes), st.config.body_timeout_s)
        body = parse_request(raw, kind)
        units = check_parts(body, _max_parts(st))
        if permit is not None:
            permit.grow(units - 1)  # a batch (or n > 1) counts as that many requests
        model = body["model"]
        _check_model(st, model)
        ctx = RouteContext(body, model, _session_key(st.config, ex, body), marks=Marks(started))
        deadline = asyncio.get_running_loop().time() + st.config.request_deadline_s
        parts = batched_prompts(body) if kind == "completions" else None
        if parts is not None:
            await ex.watched(lambda: _serve_batch(st, ex, ctx, parts, request_id, started, deadline))
        else:
            await ex.watched(lambda: _serve_routed(st, ex, ctx, kind, request_id, started, deadline))
        status = str(ex.status)
    except ClientGone:
        status = "499"
        st.metrics.errors.labels("CLIENT_DISCONNECTED").inc()
    except OpenAIError as e:
        status = str(e.status)
        if e.code and (e.code.startswith("PD_") or e.status == 429):
            st.metrics.errors.labels("RATE_LIMITED" if e.status == 429 else e.code).inc()
        if not ex.started:
            await ex.error(e)
    except Exception:
        status = "500"
        log.exception("unhandled error on %s (request %s)", endpoint, request_id)
        err = OpenAIError(500, "internal router error", code="internal_error")
        if not ex.started:
            await ex.error(err)
        else:
            await ex.abort_stream(sse_error_event(err))
    finally:
        st.metrics.requests.labels(endpoint, status).inc()
        if permit is not None:
            permit.release()
        if ctx is not None:
            _breakdown(st, ctx, endpoint, request_id, status)


def _max_parts(st: RouterState) -> int:
    """The most sequences one request may ask for: ``max_batch_parts``, and no more than the admission limits
    could ever admit at once (their capacity), so that such a request is a 400 that names the bound, not a 429."""
    capacity = st.limiter.capacity if st.limiter.enabled else None
    return min(st.config.max_batch_parts, capacity or st.config.max_batch_parts)


def _breakdown(st: RouterState, ctx: RouteContext, endpoint: str, request_id: str, status: str) -> None:
    """The request's TTFT stages into the histogram and, when tracing is on, its spans."""
    ctx.marks.ended = time.perf_counter()
    observe(st.metrics.ttft_stages, ctx.marks)
    if st.tracer is not None:
        st.tracer.emit(ctx.marks, request_id, endpoint, status, ctx.model)


async def _serve_routed(
    st: RouterState,
    ex: Exchange,
    ctx: RouteContext,
    kind: Kind,
    request_id: str,
    started: float,
    deadline: float,
) -> None:
    """The legs under the request deadline (504 before the first byte), then the decode worker's response."""
    try:
        async with asyncio.timeout_at(deadline):
            decode = await _route(st, ctx, kind, request_id)
    except TimeoutError:
        raise OpenAIError(504, "request deadline exceeded", code="PD_DEADLINE_EXCEEDED") from None
    path = PATHS[kind]
    try:
        if not ctx.body.get("stream"):
            await ex.respond(decode.status, decode.content, [(b"x-request-id", request_id.encode())])
            st.metrics.e2e.labels(path).observe(time.perf_counter() - started)
            return
        await _relay(
            st, ex, st.upstream.relay_stream(decode, deadline, path), path, request_id, ctx.marks, deadline
        )
    finally:
        await decode.close()


async def _serve_batch(
    st: RouterState,
    ex: Exchange,
    ctx: RouteContext,
    parts: list[dict],
    request_id: str,
    started: float,
    deadline: float,
) -> None:
    """A batched completion (:mod:`router.batch`): every prompt routed as its own request, one merged answer."""
    path = PATHS["completions"]

    def route(part: dict) -> Awaitable[LegResult]:
        return _route(
            st, RouteContext(part, ctx.model, ctx.session_key), "completions", st.request_ids.next()
        )

    try:
        async with asyncio.timeout_at(deadline):
            results = await gather_parts(parts, route, st.config.batch_parallelism)
    except TimeoutError:
        raise OpenAIError(504, "request deadline exceeded", code="PD_DEADLINE_EXCEEDED") from None
    n, response_id = int(ctx.body.get("n") or 1), f"cmpl-{request_id}"
    if not ctx.body.get("stream"):
        try:
            merged = merge_responses([r.json() for r in results], n, response_id)  # type: ignore[misc]
        except (ValueError, TypeError, AttributeError):
            raise OpenAIError(
                502, "a worker returned an invalid completion", code="PD_PEER_UNAVAILABLE"
            ) from None
        finally:
            for r in results:
                await r.close()
        body = msgspec.json.encode(merged)
        await ex.respond(200, body, [(b"x-request-id", request_id.encode())])
        st.metrics.e2e.labels(path).observe(time.perf_counter() - started)
        return
    options = ctx.body.get("stream_options")
    usage = isinstance(options, dict) and bool(options.get("include_usage"))
    merger = StreamMerger(len(parts), n, response_id, usage)
    chunks = merged_stream(results, lambda r: st.upstream.relay_stream(r, deadline, path), merger)
    try:
        await _relay(st, ex, chunks, path, request_id, ctx.marks, deadline)
    finally:  # also when the stream never started (a generator not started runs no finally of its own)
        for r in results:
            await r.close()


async def _relay(
    st: RouterState,
    ex: Exchange,
    chunks: AsyncIterator[bytes],
    path: str,
    request_id: str,
    marks: Marks,
    deadline: float,
) -> None:
    """Stream ``chunks`` to the client; the request deadline also bounds sending (a client that stops reading
    blocks uvicorn's send()): past it the stream ends with a ``PD_DEADLINE_EXCEEDED`` error event."""
    ttft = st.metrics.ttft.labels(path)
    await ex.start_stream([(b"x-request-id", request_id.encode())])
    first = True
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in chunks:
                if first:
                    marks.first_byte = time.perf_counter()
                    ttft.observe(marks.first_byte - marks.arrived)
                    st.metrics.count_ttft(marks.first_byte - marks.arrived)
                    first = False
                await ex.send_chunk(chunk)
            await ex.end()
    except TimeoutError:
        st.metrics.stream_aborts.inc()
        st.metrics.errors.labels("PD_DEADLINE_EXCEEDED").inc()
        log.warning("request %s: stream passed the request deadline (slow client or worker)", request_id)
        err = OpenAIError(504, "request deadline exceeded", code="PD_DEADLINE_EXCEEDED")
        await ex.abort_stream(b"\n\n" + sse_error_event(err))
        return
    finally:
        if first:  # the stream ended before its first token (deadline, broken leg, client gone): a TTFT miss
            st.metrics.count_ttft(math.inf)
        await chunks.aclose()  # type: ignore[attr-defined]
    st.metrics.e2e.labels(path).observe(time.perf_counter() - marks.arrived)


def _session_key(config: RouterConfig, ex: Exchange, body: dict) -> str | None:
    key = ex.header(config.session_header_bytes)
    if key:
        return key
    user = body.get("user")
    return user if isinstance(user, str) and user else None


def _check_model(st: RouterState, model: str) -> None:
    known = st.registry.models()
    if model in known:
        return
    if not st.registry.all():
        raise OpenAIError(503, "no workers are registered with the router", code="no_workers")
    if not known:
        raise OpenAIError(503, "no healthy workers are available", code="no_workers")
    raise OpenAIError(
        404,
        f"model {model!r} does not exist; available: {', '.join(sorted(known))}",
        code="model_not_found",
        param="model",
    )


async def _analyze(st: RouterState, ctx: RouteContext, prefill_policy: Policy, decode_policy: Policy) -> None:
    """Fill ``ctx.prompt`` (and tier lookups) when a policy or conditional disaggregation needs them."""
    cfg = st.config
    rules = cfg.conditional_pd.min_uncached_tokens or cfg.conditional_pd.idle_decoder_max_uncached_tokens
    if not (prefill_policy.needs_prompt or decode_policy.needs_prompt or rules):
        return
    prefillers = st.registry.candidates("prefill", ctx.model)
    ctx.prompt = await st.analyzer.analyze(
        ctx.model, ctx.body, prefillers or st.registry.candidates("decode", ctx.model)
    )
    if not cfg.cache_aware.tier_lookup or ctx.prompt.token_ids is None:
        return
    if not ctx.prompt.tier_lookup_ok or st.registry.is_adapter(ctx.model):
        # the tiers key chunks by what the engine saw (image hashes, adapter weights): the router cannot name them
        st.metrics.tier_lookups.labels("identity").inc()
        return
    # Whose tiers to ask, in one concurrent round: the prefill pool's for a cache-aware prefill choice; the decode
    # pool's for a cache-aware decode choice and for conditional PD (a decoder whose tier, or the remote tier
    # behind it, holds the prompt serves it alone and loads it from there).
    decoders = st.registry.candidates("decode", ctx.model)
    if _held_by_a_decoder(st, ctx, decoders, decode_policy) or _decode_only_on_the_one_decoder(
        st, ctx, decoders
    ):
        st.metrics.tier_lookups.labels("skipped").inc()
        return
    asked: dict[str, Worker] = {}
    if prefill_policy.needs_prompt:
        asked.update((w.id, w) for w in prefillers)
    if decode_policy.needs_prompt or rules:
        asked.update((w.id, w) for w in decoders)
    if asked:
        st.metrics.tier_lookups.labels("asked").inc()
        ctx.tier_cached = await lookup_all(
            st.tier_lookup, list(asked.values()), ctx.prompt.token_ids, ctx.prompt.salt
        )


def _held_by_a_decoder(
    st: RouterState, ctx: RouteContext, decoders: list[Worker], decode_policy: Policy
) -> bool:
    """The router's own index shows a decode worker holding all but fewer than ``min_uncached_tokens`` of the
    prompt (a chat's next turn: its history went there), the decode choice follows what workers hold (or there is
    one decoder) and that worker is not so much busier than the least loaded one that the choice would pass it
    over: the request goes decode-only there whatever the tiers hold, so asking them (a round trip carrying the
    prompt's token ids: about 10 of the 23 ms route stage on 4k-token chats) is skipped."""
    threshold = st.config.conditional_pd.min_uncached_tokens
    if not threshold or not decoders or ctx.prompt is None:
        return False
    if not (decode_policy.needs_prompt or len(decoders) == 1):
        return False
    cached = cached_prefix_tokens(st.index, decoders, ctx)
    holder = max(decoders, key=lambda w: (cached[w.id], -w.in_flight))
    if ctx.prompt.n_tokens - cached[holder.id] >= threshold:
        return False
    # the cache-aware choice takes the least loaded decoder instead when the holder is this much busier: that one
    # may hold the prompt only in its tier, so ask
    least = min(w.in_flight for w in decoders)
    return holder.in_flight - least <= st.config.cache_aware.max_load_imbalance


def _decode_only_on_the_one_decoder(st: RouterState, ctx: RouteContext, decoders: list[Worker]) -> bool:
    """One decode worker, and the whole prompt (what it must compute at most) already meets a conditional-PD rule
    that only fewer uncached tokens could strengthen (the ``short_prompt`` and ``idle_decoder`` deciders): it goes
    decode-only there whatever the tiers hold, so the lookups could change neither the worker nor the mode and
    are skipped."""
    if len(decoders) != 1 or ctx.prompt is None:
        return False
    q = PDQuestion(st, ctx, decoders[0], ctx.prompt.n_tokens)
    return st.deciders.reason(q, only=_SIZE_RULES) is not None


_SIZE_RULES = (
    "short_prompt",
    "idle_decoder",
)  # deciders whose yes stays a yes when fewer tokens are uncached


async def _route(st: RouterState, ctx: RouteContext, kind: Kind, request_id: str) -> LegResult:
    """Choose workers and run the legs; returns the decode leg (its stream unread when streaming)."""
    prefill_policy = st.policies.get(ctx.model, "prefill")
    decode_policy = st.policies.get(ctx.model, "decode")
    await _analyze(st, ctx, prefill_policy, decode_policy)
    ctx.marks.routed = time.perf_counter()
    leg = Legs(st, ctx, PATHS[kind], request_id, prefill_policy, decode_policy)
    if st.config.pd_mode == "push":
        return await leg.push()
    return await leg.nixl()
