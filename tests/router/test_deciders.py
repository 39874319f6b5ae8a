"""PD deciders as plugins: the registry, the typed config that turns each on, and each decision (fakes only)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pdmesh.router.config import ConditionalPDConfig
from pdmesh.router.deciders import DECIDERS, DeciderChain, PDQuestion


def _worker(role="decode", in_flight=0, pd_pending=0):
    return SimpleNamespace(info=SimpleNamespace(role=role), in_flight=in_flight, pd_pending=pd_pending)


def _question(uncached=None, body=None, target=None, prefillers=(), queued=0):
    registry = SimpleNamespace(candidates=lambda role, model: list(prefillers))
    st = SimpleNamespace(registry=registry, prefill_tokens_in_flight=queued)
    ctx = SimpleNamespace(body=body or {"prompt": "x " * 40}, model="m")
    return PDQuestion(st, ctx, target or _worker(in_flight=1), uncached)


def test_every_decider_has_its_registry_name_and_the_config_turns_rules_off():
    chain = DeciderChain(ConditionalPDConfig())
    assert [d.name for d in chain.deciders] == list(DECIDERS)
    off = DeciderChain(
        ConditionalPDConfig(
            min_uncached_tokens=0, idle_decoder_max_uncached_tokens=0, max_prefill_queue_tokens=0
        )
    )
    assert [d.name for d in off.deciders] == ["prompt_logprobs", "data_parallel"]
    with pytest.raises(ValueError, match="unknown PD deciders"):
        DeciderChain(ConditionalPDConfig(), ["short_prompt", "nope"])


def test_the_first_decider_that_says_yes_names_the_reason():
    chain = DeciderChain(ConditionalPDConfig(min_uncached_tokens=512, idle_decoder_max_uncached_tokens=2048))
    assert chain.reason(_question(uncached=100)) == "short_prompt"
    assert chain.reason(_question(uncached=1000)) is None  # busy decoder, long prompt, no queue
    assert chain.reason(_question(uncached=1000, target=_worker())) == "idle_decoder"
    assert chain.reason(_question(uncached=1000, target=_worker(pd_pending=1))) is None
    logprobs = {"prompt": "x", "prompt_logprobs": 1}
    assert chain.reason(_question(uncached=100, body=logprobs)) == "prompt_logprobs"
    # only a subset asked
    assert chain.reason(_question(uncached=100), only=("idle_decoder",)) is None


def test_data_parallel_and_prefill_queue():
    chain = DeciderChain(ConditionalPDConfig(max_prefill_queue_tokens=4096))
    both = _worker(role="both", in_flight=1)
    assert chain.reason(_question(uncached=5000, target=both, prefillers=[both])) == "data_parallel"
    assert chain.reason(_question(uncached=5000, target=both, prefillers=[both, _worker("prefill")])) is None
    two = [_worker("prefill"), _worker("prefill")]
    assert chain.reason(_question(uncached=5000, prefillers=two, queued=8191)) is None
    assert chain.reason(_question(uncached=5000, prefillers=two, queued=8192)) == "prefill_queue"


def test_every_policy_answers_its_registry_name():
    from pdmesh.router.policies import POLICIES, Prefer, make_policy
    from pdmesh.router.prefix_index import PrefixIndex

    for name in POLICIES:
        policy = make_policy(name, PrefixIndex(1000))
        assert policy.name == name
        assert Prefer("w1", policy).name == f"prefer({name})"
