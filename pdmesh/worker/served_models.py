"""What models a worker's engine serves now: the base model and every LoRA adapter, including adapters loaded at
run time (vLLM's ``/v1/load_lora_adapter``), read from the engine's ``GET /v1/models``.

:class:`ServedModels` is asked before each heartbeat; it re-reads the engine at most every ``interval_s`` (each
read bounded by ``timeout_s``) and keeps the last answer when a read fails, so a slow engine delays nothing and
never empties the list. An adapter is a card whose ``parent`` names another card (vLLM's model cards).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx

from pdmesh.router.registration import WorkerRegistration

log = logging.getLogger("pdmesh.worker")


def models_from_cards(cards: list) -> tuple[list[str], list[str]]:
    """(every served model id, the ids that are LoRA adapters) from vLLM's ``/v1/models`` ``data``; base models
    first. Cards that are not objects with a string id are ignored."""
    ids = [c["id"] for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str)]
    adapters = [
        c["id"]
        for c in cards
        if isinstance(c, dict) and isinstance(c.get("id"), str) and c.get("parent") not in (None, c.get("id"))
    ]
    base = [m for m in ids if m not in adapters]
    return base + adapters, adapters


class ServedModels:
    def __init__(
        self,
        url: Callable[[], str],
        headers: dict[str, str],
        interval_s: float = 2.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url  # the engine's base URL now (an engine restart may move it)
        self._headers = headers
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._clock = clock
        self._next = 0.0
        self._last: tuple[list[str], list[str]] | None = None

    async def refresh(self, reg: WorkerRegistration, client: httpx.AsyncClient) -> WorkerRegistration:
        """``reg`` with the engine's current models and adapters (the last known ones when the engine does not
        answer in time; ``reg`` itself before the first answer)."""
        now = self._clock()
        if now >= self._next:
            self._next = now + self.interval_s
            try:
                r = await client.get(
                    self._url() + "/v1/models", headers=self._headers, timeout=self.timeout_s
                )
                r.raise_for_status()
                models, adapters = models_from_cards(r.json().get("data") or [])
                if models:
                    if self._last is not None and models != self._last[0]:
                        log.info("engine now serves %s (adapters: %s)", models, adapters or "none")
                    self._last = (models, adapters)
            except (httpx.HTTPError, ValueError, AttributeError) as e:
                log.warning(
                    "could not read the engine's models (%s); keeping the last known", type(e).__name__
                )
        if self._last is None or (self._last[0] == reg.models and self._last[1] == reg.adapters):
            return reg
        return reg.model_copy(update={"models": self._last[0], "adapters": self._last[1]})
