"""The decode side of a push PD request: wait for the pushed chunks until the deadline, then fall back.

The router sends the decode leg with ``kv_transfer_params.pdmesh = {transfer_id, deadline_ms}`` to the node the
prefill worker pushes to. The decode worker does not know which chunks are on their way; it knows the prompt,
so it knows their keys. Each time vLLM's scheduler considers the request, the connector looks the keys up in the
local tier and asks :meth:`PushWait.decide`:

- all chunks the request can load are ready -> load them (``"load"``);
- some are missing and the deadline has not passed -> keep the request waiting (``"wait"``: the connector returns
  ``None`` to vLLM, which asks again next step; other requests keep running);
- the deadline has passed -> load what is ready and compute the rest (``"load"``, counted as a fallback and
  reported in the response's ``kv_transfer_params.pdmesh.fallback``). Never wrong output, never a hang.

The deadline runs from the last progress (the wait's start, or the last poll that found more chunks ready): the
router dispatches the decode leg together with the prefill leg, so the wait spans the prefill worker's compute,
which pushes chunks as its steps complete them; a push that stops arriving is what the deadline bounds. If the
prefill leg fails, the router cancels this request itself.

Pure: no I/O, no vLLM; time comes from the caller (the connector's injectable clock).
"""

from __future__ import annotations

from typing import Literal

Decision = Literal["wait", "load"]


class PushWait:
    """One decode request's wait for pushed chunks. Not thread-safe (vLLM's scheduler thread owns it)."""

    def __init__(self, transfer_id: str, deadline_s: float, started_at: float) -> None:
        self.transfer_id = transfer_id
        self.deadline_s = deadline_s
        self.started_at = started_at
        self.fell_back = False  # the deadline passed with chunks still missing
        self.best_ready = 0  # most chunks seen ready so far
        self.last_progress = started_at
        self.loaded_tokens = 0  # tokens the request loaded from the tier (set by the connector)

    def decide(self, ready: int, needed: int, now: float) -> Decision:
        """``ready`` of ``needed`` leading chunks are in the local tier at ``now``: wait or load?
        Waits while the last progress is less than ``deadline_s`` old."""
        if ready >= needed or self.fell_back:
            return "load"
        if ready > self.best_ready:
            self.best_ready, self.last_progress = ready, now
        if now - self.last_progress < self.deadline_s:
            return "wait"
        self.fell_back = True
        return "load"

    def report(self) -> dict:
        """What the decode response's ``kv_transfer_params.pdmesh`` says."""
        return {
            "transfer_id": self.transfer_id,
            "loaded_tokens": self.loaded_tokens,
            "fallback": self.fell_back,
        }
