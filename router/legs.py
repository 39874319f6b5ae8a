"""The worker legs of one request: which workers, which legs, in which order (push PD, NIXL PD, decode-only).

Push PD (:meth:`Legs.push`), the default mode:
1. choose the decode worker D (its pool's policy); go decode-only when a PD decider says so
   (:mod:`pdmesh.router.deciders`: the prompt's logits are needed, a data-parallel pool, a short uncached part, an
   idle decoder, a queued prefill pool) or when D has no transfer receiver;
2. the prefill leg: a prefill worker computes the prompt and pushes its KV chunks to D; then the decode leg on D,
   whose connector waits (bounded by the transfer deadline) for chunks still in flight;
3. ``pd_overlap_legs`` (off by default) sends the decode leg at the same time as the prefill leg: D's wait then
   spans the prefill worker's queue and compute, which saves D's request setup (tens of ms) but, when the prefill
   pool is saturated, makes D wait out the deadline and compute the prompt itself (measured on the workload
   benchmark: chat TTFT p90 6.9 s with it against one engine's 2.4 s);
4. if the prefill leg fails with a 5xx, D gets the plain request (a counted fallback; an overlapped decode leg is
   cancelled first, which aborts it on D: nothing was relayed yet); a 4xx from the prefill leg is the client's
   error and is returned. If an overlapped decode leg fails before its first byte, the prefill leg is cancelled
   and the error (after the upstream's own retries on other decode workers, which get the plain request) is
   returned.

Owners: every :class:`LegResult` returned belongs to the caller (``close()``); results of cancelled legs are
closed here. Timing marks for the TTFT breakdown are stamped on ``ctx.marks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pdmesh.router import pd_nixl, pd_push
from pdmesh.router.deciders import PDQuestion
from pdmesh.router.decode_report import count_transfer_fallback, usage_prompt_tokens
from pdmesh.router.errors import OpenAIError
from pdmesh.router.openai_requests import estimate_prompt_tokens
from pdmesh.router.policies import Policy, Prefer
from pdmesh.router.policies.cache_aware import cached_prefix_tokens
from pdmesh.router.registry import Worker
from pdmesh.router.route_context import RouteContext
from pdmesh.router.state import RouterState
from pdmesh.router.upstream import LegResult

log = logging.getLogger("pdmesh.router")


def record(st: RouterState, ctx: RouteContext, worker: Worker) -> None:
    """Remember that ``worker`` now holds the prompt's prefix (router-side prefix index)."""
    if ctx.prompt is not None and ctx.prompt.keys:
        st.index.record(ctx.prompt.keys, worker.id)


def uncached_tokens(st: RouterState, ctx: RouteContext, target: Worker) -> int | None:
    """The part of the prompt ``target`` must compute (what the router's index and the tiers' lookups say it holds
    taken off); None when the prompt was not analyzed."""
    if ctx.prompt is None:
        return None
    return ctx.prompt.n_tokens - cached_prefix_tokens(st.index, [target], ctx)[target.id]


@contextlib.contextmanager
def pd_pending(target: Worker) -> Iterator[None]:
    """``target`` is the decoder of a PD request whose decode leg may not be issued yet (its ``in_flight`` does
    not show it while the prefill leg runs): counted in ``target.pd_pending`` until the request's legs are done."""
    target.pd_pending += 1
    try:
        yield
    finally:
        target.pd_pending -= 1


async def _cancel(task: asyncio.Task[LegResult]) -> None:
    """Cancel a leg and close its result if it had one already (aborts the request on its worker)."""
    task.cancel()
    with contextlib.suppress(BaseException):
        result = await task
        await result.close()


@dataclass
class Legs:
    st: RouterState
    ctx: RouteContext
    path: str
    request_id: str
    prefill_policy: Policy
    decode_policy: Policy

    def _choose_decoder(self) -> Worker:
        decoders = self.st.registry.candidates("decode", self.ctx.model)
        if not decoders:
            raise OpenAIError(
                503, f"no healthy decode worker for model {self.ctx.model!r}", code="PD_PEER_UNAVAILABLE"
            )
        return self.decode_policy.choose(decoders, self.ctx)

    def _decode_only_reason(self, target: Worker) -> str | None:
        """The PD deciders' answer (:mod:`pdmesh.router.deciders`): why this request skips the prefill leg."""
        uncached = uncached_tokens(self.st, self.ctx, target)
        return self.st.deciders.reason(PDQuestion(self.st, self.ctx, target, uncached))

    async def _prefill(self, body_for: Callable[[Worker], dict]) -> LegResult:
        marks = self.ctx.marks
        marks.prefill_start = t0 = time.perf_counter()
        queued = self.st.metrics.pool_inflight_tokens.labels("prefill")
        tokens = (
            self.ctx.prompt.n_tokens if self.ctx.prompt is not None else estimate_prompt_tokens(self.ctx.body)
        )
        queued.inc(tokens)
        self.st.prefill_tokens_in_flight += tokens
        try:
            result = await self.st.upstream.call(
                "prefill", "prefill", self.ctx.model, self.path, body_for, self.prefill_policy, self.request_id,
                ctx=self.ctx,
            )  # fmt: skip
        finally:
            queued.dec(tokens)
            self.st.prefill_tokens_in_flight -= tokens
        marks.prefill_end = time.perf_counter()
        self.st.metrics.prefill.observe(marks.prefill_end - t0)
        self.st.metrics.prompt_tokens.inc(usage_prompt_tokens(result.content))
        record(self.st, self.ctx, result.worker)
        if self.ctx.prompt is not None:
            cached = cached_prefix_tokens(self.st.index, [result.worker], self.ctx)
            self.st.metrics.cached_tokens.inc(min(cached[result.worker.id], self.ctx.prompt.n_tokens))
        return result

    async def _decode(self, body_for: Callable[[Worker], dict], policy: Policy) -> LegResult:
        self.ctx.marks.decode_start = time.perf_counter()
        result = await self.st.upstream.call(
            "decode",
            "decode",
            self.ctx.model,
            self.path,
            body_for,
            policy,
            self.request_id,
            bool(self.ctx.body.get("stream")),
            ctx=self.ctx,
        )
        record(self.st, self.ctx, result.worker)
        return result

    async def _decode_only(self, target: Worker, reason: str) -> LegResult:
        body = self.ctx.body
        self.ctx.marks.prefill_start = self.ctx.marks.prefill_end = (
            None  # a failed prefill leg is not a stage
        )
        result = await self._decode(lambda _w: body, Prefer(target.id, self.decode_policy))
        if self.ctx.prompt is not None:
            self.st.metrics.prompt_tokens.inc(self.ctx.prompt.n_tokens)
        elif not result.stream:
            self.st.metrics.prompt_tokens.inc(usage_prompt_tokens(result.content))
        self.st.metrics.pd_requests.labels("decode_only").inc()
        self.st.metrics.decode_only.labels(reason).inc()
        return result

    async def push(self) -> LegResult:
        """Push PD: the prefill leg, then (or, with ``pd_overlap_legs``, at the same time) the decode leg."""
        target = self._choose_decoder()
        reason = self._decode_only_reason(target)
        if reason is None and not target.info.transfer_address:
            reason = "no_transfer_address"
        if reason is not None:
            return await self._decode_only(target, reason)
        with pd_pending(target):
            return await self._push_legs(target)

    async def _push_legs(self, target: Worker) -> LegResult:
        st, body = self.st, self.ctx.body
        transfer_id, deadline_ms = self.request_id, st.config.pd_transfer_deadline_ms
        push_to = target.info.transfer_address
        assert push_to is not None
        prompt = self.ctx.prompt
        # the grant binds to the prompt's token ids when the router has the engine's own tokenization of it
        # (not under truncation: the engine then keys fewer tokens than the router saw)
        bound = prompt is not None and prompt.exact and self.ctx.body.get("truncate_prompt_tokens") is None
        prompt_ids = prompt.token_ids if bound else None

        def decode_body(w: Worker) -> dict:
            return pd_push.decode_request(body, transfer_id, deadline_ms) if w.id == target.id else body

        prefill = asyncio.create_task(
            self._prefill(
                lambda _w: pd_push.prefill_request(
                    body,
                    transfer_id,
                    push_to,
                    deadline_ms,
                    st.config.cluster_token,
                    target.info.device_transfer_address,
                    prompt_ids,
                )
            )
        )
        decode: asyncio.Task[LegResult] | None = None
        if st.config.pd_overlap_legs:
            decode = asyncio.create_task(self._decode(decode_body, Prefer(target.id, self.decode_policy)))
        legs = [t for t in (prefill, decode) if t is not None]
        try:
            await asyncio.wait(legs, return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:  # cancelled (client gone, deadline): every leg goes
            for t in legs:
                await _cancel(t)
            raise
        if prefill.done() and prefill.exception() is not None:
            if decode is not None:
                await _cancel(decode)
            e = prefill.exception()
            if not isinstance(e, OpenAIError) or e.status < 500:
                raise e  # type: ignore[misc]
            log.warning(
                "request %s: prefill leg failed (%s); decode worker computes the prompt",
                self.request_id,
                e.message,
            )
            st.metrics.pd_requests.labels("fallback").inc()
            return await self._decode_only(target, "prefill_unavailable")
        if decode is not None and decode.exception() is not None:
            await _cancel(prefill)
            raise decode.exception()  # type: ignore[misc]
        prefill.result()  # the prefill leg's answer is not relayed (its token is the decoder's too)
        if decode is None:
            result = await self._decode(decode_body, Prefer(target.id, self.decode_policy))
        else:
            result = decode.result()
        st.metrics.pd_requests.labels("push").inc()
        if not body.get("stream"):
            count_transfer_fallback(st.metrics, result.content, self.request_id)
        return result

    async def nixl(self) -> LegResult:
        """Stock NIXL PD: prefill leg (do_remote_decode), then the decode leg with its kv_transfer_params."""
        target = self._choose_decoder()
        reason = self._decode_only_reason(target)
        if reason is not None:
            return await self._decode_only(target, reason)
        with pd_pending(target):
            return await self._nixl_legs(target)

    async def _nixl_legs(self, target: Worker) -> LegResult:
        st, body = self.st, self.ctx.body
        prefill = await self._prefill(lambda _w: pd_nixl.prefill_request(body))
        try:
            prefill_json = prefill.json()
        except ValueError:
            raise OpenAIError(
                502, "prefill worker returned invalid JSON", code="PD_PREFILL_BAD_RESPONSE"
            ) from None
        if not isinstance(prefill_json, dict):
            raise OpenAIError(502, "prefill worker returned a non-object", code="PD_PREFILL_BAD_RESPONSE")
        decode_body = pd_nixl.decode_request(body, prefill_json)
        decode = await self._decode(lambda _w: decode_body, Prefer(target.id, self.decode_policy))
        st.metrics.pd_requests.labels("nixl").inc()
        return decode
