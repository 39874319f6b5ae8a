"""Where one request's time to first token goes, as seen by the router: marks, stages, histograms, spans.

The flow stamps :class:`Marks` (``time.perf_counter()`` values, None until reached) as the request passes each
point; at the request's end :func:`observe` turns them into stage durations:

- ``route``: arrival -> the legs start (body read, validation, prompt analysis: tokenize, tier lookups);
- ``prefill_leg``: the prefill worker's whole leg (its queue, tier load, compute, and the push it starts);
- ``decode_first_byte``: the decode leg's dispatch -> its first byte (streams): for a push PD request this
  includes the decode worker's wait for the pushed KV, its load and the first token; for decode-only the
  prompt's compute;
- ``decode_after_prefill``: the prefill leg's end -> the first byte (push PD streams): what is left on the
  critical path once the prefill worker answered (the rest of the push, the load, the first token).

The decode leg is dispatched while the prefill leg runs (push PD), so stages overlap: ``route + prefill_leg +
decode_after_prefill`` is the critical path, ``decode_first_byte`` the decode worker's view.
Prometheus: ``pdmesh_router_ttft_stage_seconds{stage}``. OpenTelemetry: when a tracer is configured
(:mod:`pdmesh.router.tracing`), the same marks become one span per request with a child span per stage, built
after the fact from the marks, so tracing costs nothing on the request's path and nothing at all when off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Marks:
    arrived: float
    routed: float | None = None
    prefill_start: float | None = None
    prefill_end: float | None = None
    decode_start: float | None = None
    first_byte: float | None = None
    ended: float | None = None

    def stages(self) -> dict[str, tuple[float, float]]:
        """Stage name -> (start, end) for every stage whose two marks were reached."""
        spans = {
            "route": (self.arrived, self.routed),
            "prefill_leg": (self.prefill_start, self.prefill_end),
            "decode_first_byte": (self.decode_start, self.first_byte),
            "decode_after_prefill": (self.prefill_end, self.first_byte),
        }
        return {name: (a, b) for name, (a, b) in spans.items() if a is not None and b is not None and b >= a}


class StageHistogram(Protocol):
    def labels(self, stage: str) -> _Observer: ...


class _Observer(Protocol):
    def observe(self, amount: float) -> None: ...


def observe(histogram: StageHistogram, marks: Marks) -> dict[str, float]:
    """Record each reached stage's duration in ``histogram``; returns them (seconds)."""
    durations = {name: b - a for name, (a, b) in marks.stages().items()}
    for name, seconds in durations.items():
        histogram.labels(name).observe(seconds)
    return durations


def wall_clock() -> Callable[[float], int]:
    """A converter of ``perf_counter`` values to wall-clock nanoseconds (span timestamps), with one offset so
    that the order of the converted marks is the order of the marks."""
    offset = time.time_ns() - int(time.perf_counter() * 1e9)
    return lambda perf: int(perf * 1e9) + offset
