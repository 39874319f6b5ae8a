"""Conditional disaggregation as plugins: one module per PD decider, all behind
:class:`pdmesh.router.deciders.base.Decider`.

- ``base``: the interface (``name``, ``decode_only(PDQuestion)``) and :class:`PDQuestion`.
- ``prompt_logprobs``, ``data_parallel``: what PD cannot serve or cannot help (always on).
- ``short_prompt``, ``idle_decoder``, ``prefill_queue``: the conditional-PD rules, each configured by its field of
  ``conditional_pd`` (:class:`pdmesh.router.config.ConditionalPDConfig`); 0 turns a rule off (no decider built).

:data:`DECIDERS` is the registry, in the order they are asked: a name and a factory from the typed config (None:
off). Adding a decider = one module + one line here. :class:`DeciderChain` asks them in order; the first yes
names the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pdmesh.router.config import ConditionalPDConfig
from pdmesh.router.deciders.base import Decider, PDQuestion
from pdmesh.router.deciders.data_parallel import DataParallel
from pdmesh.router.deciders.idle_decoder import IdleDecoder
from pdmesh.router.deciders.prefill_queue import PrefillQueue
from pdmesh.router.deciders.prompt_logprobs import PromptLogprobs
from pdmesh.router.deciders.short_prompt import ShortPrompt

__all__ = ["DECIDERS", "Decider", "DeciderChain", "PDQuestion"]

# name -> factory(conditional PD config) -> decider, or None when its rule is off; asked in this order
DECIDERS: dict[str, Callable[[ConditionalPDConfig], Decider | None]] = {
    "prompt_logprobs": lambda _cfg: PromptLogprobs(),
    "data_parallel": lambda _cfg: DataParallel(),
    "short_prompt": lambda cfg: ShortPrompt(cfg.min_uncached_tokens) if cfg.min_uncached_tokens else None,
    "idle_decoder": lambda cfg: (
        IdleDecoder(cfg.idle_decoder_max_uncached_tokens) if cfg.idle_decoder_max_uncached_tokens else None
    ),
    "prefill_queue": lambda cfg: (
        PrefillQueue(cfg.max_prefill_queue_tokens) if cfg.max_prefill_queue_tokens else None
    ),
}


class DeciderChain:
    """The deciders a configuration turns on, in registry order."""

    def __init__(self, cfg: ConditionalPDConfig, names: Sequence[str] | None = None) -> None:
        """``names``: a subset of :data:`DECIDERS` (default: all); ValueError for an unknown name."""
        unknown = [n for n in names or () if n not in DECIDERS]
        if unknown:
            raise ValueError(f"unknown PD deciders {unknown}; choose from {', '.join(DECIDERS)}")
        chosen = [n for n in DECIDERS if names is None or n in names]
        self.deciders: list[Decider] = [d for n in chosen if (d := DECIDERS[n](cfg)) is not None]

    def reason(self, q: PDQuestion, only: Sequence[str] | None = None) -> str | None:
        """The name of the first decider (of ``only``, when given) that sends the request decode-only."""
        for d in self.deciders:
            if (only is None or d.name in only) and d.decode_only(q):
                return d.name
        return None
