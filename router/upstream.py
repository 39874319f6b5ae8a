"""Calling workers: one leg (prefill or decode) with retries on other workers before the first byte.

Contract:
- A leg attempt that fails at the connection level (refused, reset, timeout before a response) marks the
  worker failed (cooldown) and is retried on another healthy worker, up to ``max_attempts``.
- A worker's 5xx is retried the same way; its 4xx is the client's fault and is relayed as is.
- Nothing is retried once the first byte of a response has been sent to the client; a streamed response that
  breaks later ends with an SSE error event (:func:`relay_stream`).
- Every call has a timeout (connect and read from the shared ``httpx.AsyncClient``); the response object of a
  streaming leg is owned by :func:`relay_stream`, which always closes it (also when the client disconnects and
  the generator is closed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx

from router.errors import OpenAIError, sse_error_event
from router.metrics import RouterMetrics
from router.policies.base import Policy
from router.registry import Registry, Worker

log = logging.getLogger("pdmesh.router")


@dataclass
class LegResult:
    worker: Worker
    response: httpx.Response  # for stream=True the body is not read yet; caller must close it


def _relay_error(resp: httpx.Response, body: bytes) -> OpenAIError:
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
    status = resp.status_code
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
        self, client: httpx.AsyncClient, registry: Registry, metrics: RouterMetrics, max_attempts: int
    ):
        self.client = client
        self.registry = registry
        self.metrics = metrics
        self.max_attempts = max_attempts

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
    ) -> LegResult:
        """Run one leg on a worker of ``role`` chosen by ``policy``; retry on others as the contract says.

        Returns a 2xx response (unread when ``stream``). Raises OpenAIError: the worker's 4xx, or 503/502 with
        code PD_PEER_UNAVAILABLE when no worker could serve the leg.
        """
        tried: set[str] = set()
        last: OpenAIError | None = None
        for attempt in range(self.max_attempts):
            candidates = [w for w in self.registry.candidates(role, model) if w.id not in tried]
            if not candidates:
                break
            worker = policy.choose(candidates, {"model": model})
            tried.add(worker.id)
            if attempt:
                self.metrics.retries.labels(leg).inc()
            body = body_for(worker)
            req = self.client.build_request(
                "POST", worker.url + path, json=body, headers={"X-Request-Id": request_id}
            )
            worker.in_flight += 1
            try:
                resp = await self.client.send(req, stream=True)
            except httpx.HTTPError as e:
                worker.in_flight -= 1
                reason = type(e).__name__
                self.metrics.upstream_errors.labels(leg, reason).inc()
                self.registry.mark_failed(worker)
                log.warning("%s leg to %s failed (%s: %s); request %s", leg, worker.id, reason, e, request_id)
                last = OpenAIError(
                    503,
                    f"{leg} worker {worker.id} unavailable: {reason}",
                    code="PD_PEER_UNAVAILABLE",
                    retryable=True,
                )
                continue
            if resp.status_code >= 400:
                try:
                    data = await resp.aread()
                except httpx.HTTPError:
                    data = b""
                finally:
                    await resp.aclose()
                    worker.in_flight -= 1
                err = _relay_error(resp, data)
                self.metrics.upstream_errors.labels(leg, str(resp.status_code)).inc()
                if err.status < 500:
                    raise err
                self.registry.mark_failed(worker)
                log.warning("%s leg on %s returned %s: %s", leg, worker.id, resp.status_code, err.message)
                last = err
                continue
            self.registry.mark_ok(worker)
            if not stream:
                try:
                    await resp.aread()
                except httpx.HTTPError as e:
                    self.registry.mark_failed(worker)
                    last = OpenAIError(
                        502,
                        f"{leg} worker {worker.id} broke its response: {e}",
                        code="PD_PEER_UNAVAILABLE",
                        retryable=True,
                    )
                    continue
                finally:
                    await resp.aclose()
                    worker.in_flight -= 1
            return LegResult(worker, resp)
        if last is None:
            last = OpenAIError(
                503,
                f"no healthy {role} worker for model {model!r}",
                code="PD_PEER_UNAVAILABLE",
                retryable=True,
            )
        raise last

    async def relay_stream(
        self, result: LegResult, on_first_byte: Callable[[], None]
    ) -> AsyncIterator[bytes]:
        """Yield the worker's SSE bytes as they arrive; end with an error event if the stream breaks.

        The stream is complete only when ``data: [DONE]`` was seen. Closes the upstream response in all cases,
        which also aborts the request on the worker when the client went away.
        """
        resp, worker = result.response, result.worker
        first = True
        tail = b""
        try:
            async for chunk in resp.aiter_raw():
                if not chunk:
                    continue
                if first:
                    on_first_byte()
                    first = False
                tail = (tail + chunk)[-64:]
                yield chunk
            if b"data: [DONE]" in tail:
                return
            raise httpx.RemoteProtocolError("stream ended without [DONE]")
        except httpx.HTTPError as e:
            self.registry.mark_failed(worker)
            self.metrics.stream_aborts.inc()
            self.metrics.upstream_errors.labels("decode", type(e).__name__).inc()
            log.warning("decode stream from %s broke: %s", worker.id, e)
            prefix = b"" if tail.endswith(b"\n\n") or not tail else b"\n\n"
            err = OpenAIError(
                502,
                f"decode worker {worker.id} failed mid-stream: {type(e).__name__}",
                code="PD_PEER_UNAVAILABLE",
            )
            yield prefix + sse_error_event(err)
        finally:
            worker.in_flight -= 1
            await resp.aclose()
