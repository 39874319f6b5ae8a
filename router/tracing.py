"""OpenTelemetry spans of the TTFT breakdown (off by default).

When ``tracing.otlp_endpoint`` is set, every completion request becomes one span ``pdmesh.request`` (attributes:
request id, endpoint, model, HTTP status) with one child span per reached stage of
:mod:`pdmesh.router.ttft_breakdown` (``route``, ``prefill_leg``, ``decode_first_byte``,
``decode_after_prefill``), exported over OTLP/HTTP by a batch processor (a background thread; a full queue drops
spans, never blocks a request). Spans are built from the request's marks when it ends, so the request path pays
nothing; with tracing off :func:`make_tracer` returns None and nothing is imported.
"""

from __future__ import annotations

from typing import Any

from pdmesh.router.ttft_breakdown import Marks, wall_clock


class RequestTracer:
    """Turns finished requests' marks into spans on ``tracer`` (an ``opentelemetry.trace.Tracer``)."""

    def __init__(self, tracer: Any, provider: Any = None) -> None:
        self._tracer = tracer
        self._provider = provider  # shut down (flushes) by :meth:`close` when this object made it

    def emit(self, marks: Marks, request_id: str, endpoint: str, status: str, model: str) -> None:
        from opentelemetry import trace

        end = marks.ended if marks.ended is not None else marks.arrived
        wall_ns = wall_clock()
        root = self._tracer.start_span(
            "pdmesh.request",
            start_time=wall_ns(marks.arrived),
            attributes={
                "pdmesh.request_id": request_id,
                "http.route": endpoint,
                "http.response.status_code": int(status),
                "gen_ai.request.model": model,
            },
        )
        parent = trace.set_span_in_context(root)
        for name, (a, b) in marks.stages().items():
            span = self._tracer.start_span(name, context=parent, start_time=wall_ns(a))
            span.end(end_time=wall_ns(b))
        root.end(end_time=wall_ns(end))

    def close(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


def make_tracer(otlp_endpoint: str | None, service_name: str = "pdmesh-router") -> RequestTracer | None:
    """A tracer exporting to ``otlp_endpoint`` (e.g. ``http://collector:4318/v1/traces``), or None when unset."""
    if not otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, timeout=5)))
    return RequestTracer(provider.get_tracer("pdmesh.router"), provider)
