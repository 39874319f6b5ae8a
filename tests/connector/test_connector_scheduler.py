"""The connector's scheduler half: load/save plans, chunk alignment, PD waiting and its deadline."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="the connector imports vLLM's connector base classes")

from pdmesh.connector.metadata import for_shard
from pdmesh.connector.params import PdParams
from pdmesh.connector.scheduler import ConnectorScheduler
from pdmesh.kvcache.keys import ModelFingerprint, chunk_keys, shard_keys
from pdmesh.security import prompt_digest, push_grant

FP = ModelFingerprint(model="m", block_size=4)
TOKEN = "cluster-token"
C = 8  # chunk = 2 blocks of 4 tokens


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict | None = None
    output: list[int] = field(default_factory=list)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output


class FakeTier:
    def __init__(self) -> None:
        self.ready: set[bytes] = set()
        self.down = False
        self.calls = 0

    def lookup(self, keys):
        self.calls += 1
        if self.down:
            raise ConnectionError("tier down")
        n = 0
        for k in keys:
            if k not in self.ready:
                break
            n += 1
        return n


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def granted(params: dict, prompt: list[int] | None = None, token: str = TOKEN) -> dict:
    """The router's push grant for ``params`` ({transfer_id, push_to, deadline_ms}), bound to ``prompt``."""
    return push_grant(
        token,
        params["transfer_id"],
        params["push_to"],
        params["deadline_ms"],
        None if prompt is None else prompt_digest(prompt),
        params.get("push_to_device"),
    )


def make(save_generated=False, shards=1):
    tier, clock = FakeTier(), Clock()
    s = ConnectorScheduler(
        tier,
        lambda toks, n, ident: chunk_keys(FP, toks[: n * C], C, ident),
        C,
        4,
        save_generated,
        clock,
        token=TOKEN,
        shards=shards,
    )
    return s, tier, clock


def new_req_output(req, blocks, computed, scheduled):
    new = SimpleNamespace(req_id=req.request_id, block_ids=(blocks,), num_computed_tokens=computed)
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    return SimpleNamespace(
        scheduled_new_reqs=[new],
        scheduled_cached_reqs=cached,
        num_scheduled_tokens={req.request_id: scheduled},
    )


def cached_output(req, new_blocks, computed, scheduled):
    cached = SimpleNamespace(
        req_ids=[req.request_id],
        new_block_ids=[(new_blocks,) if new_blocks else None],
        num_computed_tokens=[computed],
        resumed_req_ids=set(),
    )
    return SimpleNamespace(
        scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={req.request_id: scheduled}
    )


def test_cold_prompt_saves_full_chunks_only():
    s, _tier, _ = make()
    req = FakeRequest("r", list(range(1, 21)))  # 20 tokens: 2 full chunks + 4
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    blocks = [10, 11, 12, 13, 14]
    s.update_state_after_alloc(req, blocks, 0)
    meta = s.build_meta(new_req_output(req, blocks, 0, 20))
    assert meta.loads == []
    (save,) = meta.saves
    assert save.keys == chunk_keys(FP, req.prompt_token_ids, C)
    assert save.block_ids == [[10, 11], [12, 13]]
    assert save.push is None
    # Nothing is saved twice.
    assert s.build_meta(cached_output(req, [], 20, 1)).saves == []


def test_hit_loads_prefix_but_always_recomputes_last_token():
    s, tier, _ = make()
    prompt = list(range(1, 17))  # exactly 2 chunks
    tier.ready = set(chunk_keys(FP, prompt, C))
    req = FakeRequest("r", prompt)
    # Only chunk 0 may load: loading chunk 1 would leave no token to compute.
    assert s.get_num_new_matched_tokens(req, 0) == (8, False)
    s.update_state_after_alloc(req, [1, 2, 3, 4], 8)
    meta = s.build_meta(new_req_output(req, [1, 2, 3, 4], 0, 16))
    (load,) = meta.loads
    assert load.keys == chunk_keys(FP, prompt, C)[:1] and load.block_ids == [[1, 2]]
    (save,) = meta.saves  # the loaded chunk is not saved again, the second one is
    assert save.block_ids == [[3, 4]]


def test_load_starts_after_local_prefix_cache_at_chunk_boundary():
    s, tier, _ = make()
    prompt = list(range(1, 30))
    tier.ready = set(chunk_keys(FP, prompt, C))  # 3 chunks ready
    req = FakeRequest("r", prompt)
    assert s.get_num_new_matched_tokens(req, 8) == (16, False)  # chunks 1 and 2
    assert s.get_num_new_matched_tokens(FakeRequest("q", prompt), 4) == (0, False)  # mid-chunk: no load


def test_tier_down_means_compute():
    s, tier, _ = make()
    tier.down = True
    assert s.get_num_new_matched_tokens(FakeRequest("r", list(range(40))), 0) == (0, False)
    assert s.stats.lookup_errors == 1


def test_pd_decode_waits_for_transfer_then_loads():
    s, tier, clock = make()
    prompt = list(range(1, 26))  # 3 chunks loadable ((25-1)//8)
    keys = chunk_keys(FP, prompt, C)
    req = FakeRequest("r", prompt, {"pdmesh": {"transfer_id": "t1", "deadline_ms": 5000}})
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    tier.ready = {keys[0]}
    clock.t = 1.0
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    tier.ready = set(keys)
    clock.t = 2.0
    assert s.get_num_new_matched_tokens(req, 0) == (24, False)
    assert s.stats.pd_fallbacks == 0


def test_pd_decode_deadline_falls_back_to_partial_compute():
    s, tier, clock = make()
    prompt = list(range(1, 26))
    keys = chunk_keys(FP, prompt, C)
    req = FakeRequest("r", prompt, {"pdmesh": {"transfer_id": "t1", "deadline_ms": 500}})
    tier.ready = {keys[0]}
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    clock.t = 0.6
    assert s.get_num_new_matched_tokens(req, 0) == (8, False)
    assert s.stats.pd_fallbacks == 1
    assert s.take_stats().count("pd_fallbacks") == 1  # what reaches vLLM's metrics (test_connector_stats.py)


def test_pd_prefill_pushes_every_prompt_chunk_including_prefix_cached_ones():
    s, _tier, _ = make()
    prompt = list(range(1, 26))
    params = {"transfer_id": "t9", "push_to": "10.0.0.2:7000", "deadline_ms": 5000}
    req = FakeRequest("r", prompt, {"pdmesh": granted(params, prompt)})
    assert s.get_num_new_matched_tokens(req, 8) == (0, False)  # vLLM had chunk 0 locally
    blocks = [5, 6, 7, 8, 9, 10, 11]
    s.update_state_after_alloc(req, blocks, 0)
    (save,) = s.build_meta(new_req_output(req, blocks, 8, 17)).saves
    assert save.keys == chunk_keys(FP, prompt, C)[:3]
    assert save.push.transfer_id == "t9.1" and save.push.peer == "10.0.0.2:7000"


def test_chunked_prefill_and_generated_tokens():
    s, _, _ = make(save_generated=True)
    req = FakeRequest("r", list(range(1, 13)))  # 12 prompt tokens
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, [1, 2], 0)
    meta = s.build_meta(new_req_output(req, [1, 2], 0, 6))  # chunked prefill: 6 of 12 tokens
    assert meta.saves == []
    assert [o.block_ids for o in s.build_meta(cached_output(req, [3], 6, 6)).saves] == [[[1, 2]]]
    req.output = [100, 101, 102, 103, 104]
    assert s.build_meta(cached_output(req, [4], 12, 1)).saves == []  # KV of 13 tokens
    (gen,) = s.build_meta(cached_output(req, [], 16, 1)).saves  # KV of 17 tokens: chunk 1 complete
    assert gen.block_ids == [[3, 4]]
    assert gen.keys == chunk_keys(FP, req.all_token_ids, C)[1:2]
    s.request_finished(req)
    assert s.active_requests() == 0


def test_pd_params_parsing_is_defensive():
    assert PdParams.from_request(None) is None
    assert PdParams.from_request({"pdmesh": "x"}) is None
    assert PdParams.from_request({"pdmesh": {"transfer_id": 5}}) is None
    assert PdParams.from_request({"pdmesh": {"transfer_id": "t", "deadline_ms": "bad", "push_to": 3}}) is None
    assert PdParams.from_request({"pdmesh": {"transfer_id": "t", "deadline_ms": "bad"}}) == PdParams(
        "t", None, 10.0
    )
    assert PdParams.from_request({"pdmesh": {"transfer_id": "t", "deadline_ms": 1e12}}).deadline_s == 600.0
    for bad in ("boom", 7, [1], {"pdmesh": []}, {"pdmesh": {"transfer_id": None}}):
        assert PdParams.from_request(bad) is None
    for deadline in (float("nan"), float("inf"), True, "1e400"):
        got = PdParams.from_request({"pdmesh": {"transfer_id": "t", "deadline_ms": deadline}})
        assert got.deadline_s == 10.0, deadline
    assert PdParams.from_request({"pdmesh": {"transfer_id": "t", "deadline_ms": -5}}).deadline_s == 0.0


@pytest.mark.parametrize("params", ["boom", 3, ["x"], {"pdmesh": "y"}, {"pdmesh": {"transfer_id": 1}}])
def test_malformed_kv_transfer_params_run_as_a_plain_request(params):
    """Connector params reach the engine from outside: malformed ones never raise in vLLM's scheduler."""
    s, tier, _ = make()
    prompt = list(range(1, 26))
    tier.ready = set(chunk_keys(FP, prompt, C)[:1])
    req = FakeRequest("r", prompt, params)
    assert s.get_num_new_matched_tokens(req, 0) == (8, False)  # a tier hit, no PD wait
    s.update_state_after_alloc(req, [1, 2, 3, 4, 5, 6, 7], 8)
    meta = s.build_meta(new_req_output(req, [1, 2, 3, 4, 5, 6, 7], 0, 25))
    assert all(op.push is None for op in meta.saves)
    assert s.request_finished(req) is None


def test_finished_pd_request_reports_loaded_tokens_and_fallback():
    s, tier, clock = make()
    prompt = list(range(1, 26))
    keys = chunk_keys(FP, prompt, C)
    req = FakeRequest("r", prompt, {"pdmesh": {"transfer_id": "t1", "deadline_ms": 100}})
    tier.ready = {keys[0]}
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    clock.t = 1.0
    assert s.get_num_new_matched_tokens(req, 0) == (8, False)
    assert s.request_finished(req) == {"pdmesh": {"transfer_id": "t1", "loaded_tokens": 8, "fallback": True}}
    plain = FakeRequest("q", prompt)
    s.get_num_new_matched_tokens(plain, 0)
    assert s.request_finished(plain) is None


def test_chunked_prefill_pushes_each_step_under_its_own_transfer_id():
    s, _, _ = make()
    prompt = list(range(1, 34))  # 4 full chunks
    params = {"transfer_id": "t", "push_to": "h:1", "deadline_ms": 10000}
    req = FakeRequest("r", prompt, {"pdmesh": granted(params, prompt)})
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, list(range(9)), 0)
    first = s.build_meta(new_req_output(req, list(range(9)), 0, 16)).saves
    second = s.build_meta(cached_output(req, [], 16, 17)).saves
    assert [op.push.transfer_id for op in first + second] == ["t.1", "t.2"]
    assert first[0].keys + second[0].keys == chunk_keys(FP, prompt, C)


def _pushes(s, req_id, prompt, pdmesh) -> bool:
    req = FakeRequest(req_id, prompt, {"pdmesh": pdmesh})
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, [1, 2, 3, 4, 5, 6, 7], 0)
    meta = s.build_meta(new_req_output(req, [1, 2, 3, 4, 5, 6, 7], 0, 25))
    assert meta.saves
    s.request_finished(req)
    return any(op.push is not None for op in meta.saves)


def test_a_push_target_the_router_did_not_sign_is_never_pushed_to():
    """A client reaching the engine directly, or holding a leaked grant, cannot make the prefill worker push
    anywhere, nor push another prompt, nor push twice under one grant, nor after the grant expired."""
    s, _tier, _ = make()
    prompt = list(range(1, 26))
    good = {"transfer_id": "t", "push_to": "10.0.0.2:7000", "deadline_ms": 5000}
    grant = granted(good, prompt)
    old = push_grant(TOKEN, "t", "10.0.0.2:7000", 5000, prompt_digest(prompt), now_ms=0)
    device_only = push_grant(TOKEN, "t", "6.6.6.6:1", 5000, prompt_digest(prompt), "10.0.0.2:7000")
    forged = [
        {**good},  # no signature
        granted(good, prompt, token="another-token"),
        {**grant, "push_to": "6.6.6.6:1"},  # a signature for another address
        {**grant, "deadline_ms": 60000},
        {**grant, "expires_ms": grant["expires_ms"] + 3_600_000},
        {**grant, "prompt": prompt_digest(prompt[:-1])},
        {**grant, "sig": "zz"},
        {**grant, "nonce": 5},
        old,  # expired long ago
        # the device landing's signature (another label) does not vouch for push_to
        {**device_only, "push_to": "10.0.0.2:7000", "sig": device_only["sig_device"]},
    ]
    for i, params in enumerate(forged):
        assert not _pushes(s, f"r{i}", prompt, params), params
    assert not _pushes(s, "other-prompt", [9, *prompt[1:]], grant)  # bound to the prompt
    assert _pushes(s, "ok", prompt, grant)
    assert not _pushes(s, "replay", prompt, grant)  # each grant is used once
    assert not _pushes(s, "respelled", prompt, {**grant, "sig": grant["sig"].upper()})  # in any spelling
    assert _pushes(s, "unbound", prompt, granted(good))  # a grant without a prompt digest (router had no ids)


def test_pd_decode_with_its_tier_down_computes_at_once():
    """Pushed chunks land in the local tier: when it does not answer there is nothing to wait for."""
    s, tier, _ = make()
    tier.down = True
    req = FakeRequest("r", list(range(1, 26)), {"pdmesh": {"transfer_id": "t1", "deadline_ms": 5000}})
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)  # no None: no wait for the 5 s deadline
    assert s.stats.pd_fallbacks == 1 and s.stats.pd_waits == 0
    assert s.request_finished(req) == {"pdmesh": {"transfer_id": "t1", "loaded_tokens": 0, "fallback": True}}


def test_waiting_decode_leg_polls_its_tier_at_most_every_poll_interval():
    """vLLM asks on every engine step; the tier is asked again only after PD_POLL_S, and the request loads on
    the first poll that finds its chunks."""
    from pdmesh.connector.scheduler import PD_POLL_S

    s, tier, clock = make()
    prompt = list(range(1, 26))
    keys = chunk_keys(FP, prompt, C)
    req = FakeRequest("r", prompt, {"pdmesh": {"transfer_id": "t1", "deadline_ms": 5000}})
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    for _ in range(100):  # engine steps within one poll interval
        assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    assert tier.calls == 1
    tier.ready = set(keys)
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)  # not asked yet
    clock.t += PD_POLL_S
    assert s.get_num_new_matched_tokens(req, 0) == (24, False)
    assert tier.calls == 2


def test_sharded_engine_loads_a_chunk_only_when_every_shard_holds_its_part():
    s, tier, clock = make(shards=2)
    prompt = list(range(1, 34))  # 4 chunks loadable ((33-1)//8)
    keys = chunk_keys(FP, prompt, C)
    rank0, rank1 = shard_keys(keys, 0, 2), shard_keys(keys, 1, 2)
    tier.ready = set(keys)  # the chunk keys themselves: what a one-shard engine stores, not this one
    assert s.get_num_new_matched_tokens(FakeRequest("a", prompt), 0) == (0, False)
    tier.ready = set(rank0) | set(rank1[:2])  # rank 1 has the first two parts only
    assert s.get_num_new_matched_tokens(FakeRequest("b", prompt), 0) == (16, False)
    # a PD decode leg waits for both ranks' pushes
    req = FakeRequest("r", prompt, {"pdmesh": {"transfer_id": "t1", "deadline_ms": 5000}})
    tier.ready = set(rank0)
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    tier.ready |= set(rank1)
    clock.t = 1.0
    assert s.get_num_new_matched_tokens(req, 0) == (32, False)


def test_each_shard_saves_and_pushes_its_part_under_its_own_keys_and_transfer():
    s, _tier, _ = make(shards=2)
    prompt = list(range(1, 26))
    params = {"transfer_id": "t9", "push_to": "10.0.0.2:7000", "deadline_ms": 5000}
    req = FakeRequest("r", prompt, {"pdmesh": granted(params, prompt)})
    s.get_num_new_matched_tokens(req, 0)
    blocks = [5, 6, 7, 8, 9, 10, 11]
    s.update_state_after_alloc(req, blocks, 0)
    meta = s.build_meta(new_req_output(req, blocks, 0, 25))
    assert for_shard(meta, 0, 1) is meta  # one shard: the plan as it is
    keys = chunk_keys(FP, prompt, C)[:3]
    for shard in (0, 1):
        (save,) = for_shard(meta, shard, 2).saves
        assert save.keys == shard_keys(keys, shard, 2) and save.block_ids == [[5, 6], [7, 8], [9, 10]]
        assert save.push.transfer_id == f"t9.1.s{shard}" and save.push.peer == "10.0.0.2:7000"
    assert meta.saves[0].keys == keys  # the scheduler's plan itself is untouched


def test_a_device_landing_is_refused_with_several_shards():
    with pytest.raises(ValueError, match="one worker process"):
        ConnectorScheduler(FakeTier(), lambda t, n, i: [], C, 4, False, landed=lambda keys: [], shards=2)


def test_each_shard_loads_its_own_part():
    s, tier, _ = make(shards=2)
    prompt = list(range(1, 18))  # 2 chunks loadable
    keys = chunk_keys(FP, prompt, C)
    tier.ready = {k for shard in (0, 1) for k in shard_keys(keys, shard, 2)}
    req = FakeRequest("r", prompt)
    assert s.get_num_new_matched_tokens(req, 0) == (16, False)
    assert s.get_num_new_matched_tokens(req, 0) == (
        16,
        False,
    )  # the parts asked again come from the request's cache
    s.update_state_after_alloc(req, [1, 2, 3, 4, 5], 16)
    meta = s.build_meta(new_req_output(req, [1, 2, 3, 4, 5], 0, 17))
    for shard in (0, 1):
        (load,) = for_shard(meta, shard, 2).loads
        assert load.keys == shard_keys(keys[:2], shard, 2) and load.block_ids == [[1, 2], [3, 4]]
