"""Calling workers: one leg (prefill or decode) with retries on other workers before the first byte.

Contract:
- A leg attempt that fails at the connection level (refused, reset, timeout before a response) counts as a
  failure of the worker's circuit breaker (a refused connection opens it at once) and is retried on another
  worker, up to ``max_attempts``, after a jittered exponential backoff.
- A worker's 5xx is retried the same way; its 4xx is the client's fault and is relayed as is.
- A half-open breaker lets exactly one request try the worker; the others pick another worker.
- Nothing is retried once the first byte of a response has been sent to the client; a streamed response that
  breaks later ends with an SSE error event (:func:`relay_stream`).
- Every call has a timeout (connect and read, from the shared :class:`router.leg_client.LegClient`); the response
  of a streaming leg is owned by :func:`relay_stream`, which always closes it (also when the client disconnects
  and the generator is closed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec

from pdmesh.router.errors import OpenAIError, sse_error_event
from pdmesh.router.leg_client import (
    LegClient,
    LegConnectError,
    LegDeadline,
    LegError,
    LegResponse,
    LegTimeout,
)
from pdmesh.router.metrics import RouterMetrics
from pdmesh.router.policies.base import Policy
from pdmesh.router.registry import Registry, Worker
from pdmesh.router.route_context import RouteContext

log = logging.getLogger("pdmesh.router")


@dataclass
class LegResult:
    """A successful leg: ``content`` for a plain leg; for a streamed leg ``stream`` is the unread response and
    the worker's in-flight count is still held: :meth:`close` (idempotent) releases both (the connection goes
    back to the pool only when the stream was complete); :meth:`Upstream.relay_stream` calls it."""

    worker: Worker
    status: int
    content: bytes = b""
    stream: LegResponse | None = None
    open: bool = False
    complete: bool = False

    def json(self) -> object:
        """The non-streamed body as JSON. Raises ValueError (msgspec.DecodeError) when it is not JSON."""
        return msgspec.json.decode(self.content)

    async def close(self) -> None:
        if self.open:
            self.open = False
            self.worker.in_flight -= 1
            if self.stream is not None:
                if self.complete:
                    self.stream.release()
                else:
                    self.stream.close()  # aborts the request on the worker


def _relay_error(status: int, body: bytes) -> OpenAIError:
    """Turn a worker's error response into an OpenAIError with the worker's message."""
    message = body.decode(errors="replace")[:2000]
    err_type, code, param = None, None, None
    try:
        parsed = json.loads(body)
        err = parsed.get("error", parsed) if isinstance(parsed, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            err_type = err.get("type")
            param = err.get("param")
            code = err.get("code")
    except (ValueError, AttributeError):
        pass
    return OpenAIError(
        status,
        message,
        type=err_type if isinstance(err_type, str) else None,
        code=str(code) if code is not None else None,
        param=param if isinstance(param, str) else None,
        retryable=status >= 500,
    )


class Upstream:
    def __init__(
        self,
        client: LegClient,
        registry: Registry,
        metrics: RouterMetrics,
        max_attempts: int,
        backoff_s: float = 0.0,
        backoff_max_s: float = 0.0,
        worker_key: str = "",
    ):
        self.client = client
        # every leg proves the router to the worker's vLLM server (its VLLM_API_KEY)
        self.auth_header = b"Authorization: Bearer %s\r\n" % worker_key.encode() if worker_key else b""
        self.registry = registry
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._rng = random.Random()

    def _backoff(self, retry: int) -> float:
        """Full-jitter exponential backoff before retry number ``retry`` (1 = the second attempt)."""
        if not self.backoff_s:
            return 0.0
        cap = min(self.backoff_max_s, self.backoff_s * (2 ** (retry - 1)))
        return self._rng.uniform(cap / 2, cap)

    def _failed(self, leg: str, worker: Worker, reason: str, hard: bool) -> None:
        self.metrics.upstream_errors.labels(leg, reason).inc()
        self.metrics.worker_leg_failures.labels(worker.id, leg).inc()
        self.registry.mark_failed(worker, hard=hard)

    async def call(
        self,
        leg: str,
        role: str,
        model: str,
        path: str,
        body_for: Callable[[Worker], dict],
        policy: Policy,
        request_id: str,
        stream: bool = False,
        ctx: RouteContext | None = None,
    ) -> LegResult:
        """Run one leg on a worker of ``role`` chosen by ``policy``; retry on others as the contract says.

        Returns a 2xx response (unread when ``stream``). Raises OpenAIError: the worker's 4xx, or 503/502 with
        code PD_PEER_UNAVAILABLE when no worker could serve the leg. Cancellation (client gone, deadline)
        closes the upstream connection, which makes vLLM abort the request; nothing leaks (in-flight counts,
        half-open breaker trials).
        """
        ctx = ctx or RouteContext({"model": model}, model)
        tried: set[str] = set()
        last: OpenAIError | None = None
        attempts = 0

        def untried() -> list[Worker]:
            return [w for w in self.registry.candidates(role, model) if w.id not in tried]

        while attempts < self.max_attempts:
            candidates = untried()
            if not candidates:
                break
            if attempts:  # a retry: back off before choosing (nothing is held while sleeping)
                delay = self._backoff(attempts)
                if delay:
                    await asyncio.sleep(delay)
                    candidates = untried()
                    if not candidates:
                        break
            worker = policy.choose(candidates, ctx)
            tried.add(worker.id)
            # Panic (every candidate's breaker open): try anyway without claiming anything. A half-open
            # breaker lets one attempt through: this one holds that trial until it ends (released below).
            panic = not worker.breaker.allows()
            holds_trial = not panic and worker.breaker.state == "half_open"
            if holds_trial and not worker.breaker.try_acquire():
                continue
            if attempts:
                self.metrics.retries.labels(leg).inc()
            attempts += 1
            self.metrics.worker_legs.labels(worker.id, leg).inc()
            data = msgspec.json.encode(body_for(worker))
            worker.in_flight += 1
            owned = False  # True once the LegResult (and its in-flight count) goes to the caller
            try:
                try:
                    resp = await self.client.post(
                        worker.url,
                        path,
                        data,
                        b"X-Request-Id: %s\r\n%s" % (request_id.encode(), self.auth_header),
                    )
                except LegError as e:
                    reason = _reason(e)
                    self._failed(leg, worker, reason, hard=isinstance(e, LegConnectError) and e.refused)
                    log.warning(
                        "%s leg to %s failed (%s: %s); request %s", leg, worker.id, reason, e, request_id
                    )
                    last = OpenAIError(
                        503,
                        f"{leg} worker {worker.id} unavailable: {reason}",
                        code="PD_PEER_UNAVAILABLE",
                        retryable=True,
                    )
                    continue
                if resp.status >= 300:  # a worker does not redirect: 3xx is a misconfigured worker
                    try:
                        content = await resp.read()
                    except LegError:
                        content = b""
                    resp.release()
                    if resp.status < 400:
                        err = OpenAIError(
                            502,
                            f"{leg} worker {worker.id} answered {resp.status} (a redirect: check its URL)",
                            code="PD_PEER_UNAVAILABLE",
                            retryable=True,
                        )
                    else:
                        err = _relay_error(resp.status, content)
                    if err.status < 500:
                        self.metrics.upstream_errors.labels(leg, str(resp.status)).inc()
                        self.registry.mark_ok(worker)  # the worker is fine; the request is not
                        raise err
                    self._failed(leg, worker, str(resp.status), hard=False)
                    log.warning("%s leg on %s returned %s: %s", leg, worker.id, resp.status, err.message)
                    last = err
                    continue
                if stream:
                    self.registry.mark_ok(worker)
                    owned = True
                    return LegResult(worker, resp.status, stream=resp, open=True)
                try:
                    content = await resp.read()  # closes the connection on any error, cancellation included
                except LegError as e:
                    self._failed(leg, worker, _reason(e), hard=False)
                    last = OpenAIError(
                        502,
                        f"{leg} worker {worker.id} broke its response: {_reason(e)}",
                        code="PD_PEER_UNAVAILABLE",
                        retryable=True,
                    )
                    continue
                resp.release()
                self.registry.mark_ok(worker)
                return LegResult(worker, resp.status, content)
            finally:
                if holds_trial:
                    worker.breaker.release_trial()
                if not owned:
                    worker.in_flight -= 1
        if last is None:
            last = OpenAIError(
                503,
                f"no healthy {role} worker for model {model!r}",
                code="PD_PEER_UNAVAILABLE",
                retryable=True,
            )
        raise last

    async def relay_stream(
        self,
        result: LegResult,
        deadline: float | None = None,
        endpoint: str = "",
        done_marker: bytes | None = b"data: [DONE]",
    ) -> AsyncIterator[bytes]:
        """Yield the worker's SSE bytes as they arrive; end with an error event if the stream breaks.

        The stream is complete only when ``done_marker`` was seen (``None``: when it ends cleanly, as the
        Responses API's event streams do). ``deadline`` (event-loop time) bounds the
        whole stream: past it the stream ends with a ``PD_DEADLINE_EXCEEDED`` error event. Closes the upstream
        response in all cases, which also aborts the request on the worker when the client went away.
        """
        resp, worker = result.stream, result.worker
        assert resp is not None
        first = True
        tail = b""
        itl = self.metrics.itl.labels(endpoint)
        loop = asyncio.get_running_loop()
        first_t = last_t = 0.0
        gaps = 0
        try:
            async for chunk in resp.chunks(deadline):
                now = loop.time()
                if first:
                    first, first_t = False, now
                else:
                    itl.observe(now - last_t)
                    gaps += 1
                last_t = now
                tail = (tail + chunk)[-64:]
                yield chunk
            if done_marker is None or done_marker in tail:
                result.complete = True
                if gaps:
                    self.metrics.count_itl((last_t - first_t) / gaps)
                return
            raise _StreamIncomplete("stream ended without [DONE]")
        except LegDeadline:
            self.metrics.stream_aborts.inc()
            self.metrics.errors.labels("PD_DEADLINE_EXCEEDED").inc()
            log.warning("decode stream from %s passed the request deadline", worker.id)
            err = OpenAIError(504, "request deadline exceeded", code="PD_DEADLINE_EXCEEDED")
            yield _sep(tail) + sse_error_event(err)
        except LegTimeout as e:
            self.registry.mark_failed(worker)
            self.metrics.stream_aborts.inc()
            self.metrics.errors.labels("PD_PEER_UNAVAILABLE").inc()
            self.metrics.upstream_errors.labels("decode", _reason(e)).inc()
            err = OpenAIError(
                502, f"decode worker {worker.id} stalled mid-stream", code="PD_PEER_UNAVAILABLE"
            )
            yield _sep(tail) + sse_error_event(err)
        except (LegError, _StreamIncomplete) as e:
            self.registry.mark_failed(worker)
            self.metrics.stream_aborts.inc()
            self.metrics.errors.labels("PD_PEER_UNAVAILABLE").inc()
            self.metrics.upstream_errors.labels("decode", _reason(e)).inc()
            log.warning("decode stream from %s broke: %s", worker.id, e)
            err = OpenAIError(
                502,
                f"decode worker {worker.id} failed mid-stream: {_reason(e)}",
                code="PD_PEER_UNAVAILABLE",
            )
            yield _sep(tail) + sse_error_event(err)
        finally:
            await result.close()


class _StreamIncomplete(Exception):
    """The worker ended the stream (cleanly at the HTTP level) without ``data: [DONE]``."""


_REASONS = {
    "LegConnectError": "connect_error",
    "LegTimeout": "read_timeout",
    "LegDeadline": "deadline",
    "LegDisconnected": "disconnected",
    "_StreamIncomplete": "incomplete_stream",
}


def _reason(e: Exception) -> str:
    """The ``reason`` label of a leg failure (bounded set)."""
    if isinstance(e, LegConnectError) and not e.refused:
        return "connect_timeout"
    return _REASONS.get(type(e).__name__, "error")


def _sep(tail: bytes) -> bytes:
    """Blank line needed before an error event so it is not glued to a partial event."""
    return b"" if tail.endswith(b"\n\n") or not tail else b"\n\n"
