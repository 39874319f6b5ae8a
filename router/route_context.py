"""What policies see about one request: the parsed body, its model, session key and prompt analysis."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdmesh.router.prompt_keys import PromptInfo
from pdmesh.router.ttft_breakdown import Marks


@dataclass
class RouteContext:
    body: dict
    model: str
    session_key: str | None = None
    # Set only when a policy of the model's pools (or conditional disaggregation) needs it.
    prompt: PromptInfo | None = None
    # Worker id -> leading prompt tokens its KV tier holds (from the tiers' /lookup).
    tier_cached: dict[str, int] = field(default_factory=dict)
    # Timing marks of this request (TTFT breakdown); the flow stamps them.
    marks: Marks = field(default_factory=lambda: Marks(time.perf_counter()))
