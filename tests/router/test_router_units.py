"""Unit tests of the router's building blocks: policies, prefix index, prompt keys, breaker, limits, registry."""

from __future__ import annotations

import pytest

from pdmesh.breaker import CircuitBreaker
from pdmesh.router.config import LimitsConfig, RouterConfigError, load_router_config
from pdmesh.router.errors import OpenAIError
from pdmesh.router.limits import Limiter, TokenBucket
from pdmesh.router.policies import CacheAware, PowerOfTwo, RoundRobin, SessionAffinity, make_policy
from pdmesh.router.prefix_index import PrefixIndex
from pdmesh.router.prompt_keys import model_seed, templated_text, text_info, token_info, token_keys
from pdmesh.router.registration import WorkerRegistration
from pdmesh.router.registry import BreakerSettings, Registry
from pdmesh.router.route_context import RouteContext


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_registry(n: int, clock: Clock | None = None, failures: int = 1) -> tuple[Registry, list]:
    reg = Registry(10.0, 5.0, clock=clock or Clock(), breaker=BreakerSettings(failures, 5.0, 40.0))
    ws = [
        reg.upsert(WorkerRegistration(worker_id=f"w{i}", role="prefill", url=f"http://h{i}:1", models=["m"]))
        for i in range(n)
    ]
    return reg, ws


def ctx(**kw) -> RouteContext:
    return RouteContext({"model": "m"}, "m", **kw)


def test_round_robin_cycles_in_id_order():
    _, ws = make_registry(3)
    rr = RoundRobin()
    assert [rr.choose(ws, ctx()).id for _ in range(6)] == ["w0", "w1", "w2", "w0", "w1", "w2"]


def test_power_of_two_prefers_less_loaded():
    _, ws = make_registry(2)
    ws[0].in_flight, ws[1].in_flight = 5, 1
    p2c = PowerOfTwo(seed=1)
    assert {p2c.choose(ws, ctx()).id for _ in range(20)} == {"w1"}
    _, many = make_registry(10)
    for i, w in enumerate(many):
        w.in_flight = i
    picks = [p2c.choose(many, ctx()).id for _ in range(200)]
    assert "w9" not in picks  # the most loaded never wins a pair


def test_session_affinity_is_sticky_and_moves_only_lost_sessions():
    _, ws = make_registry(4)
    pol = SessionAffinity(seed=0)
    before = {s: pol.choose(ws, ctx(session_key=s)).id for s in (f"s{i}" for i in range(40))}
    assert len(set(before.values())) > 1
    assert all(pol.choose(ws, ctx(session_key=s)).id == w for s, w in before.items())
    survivors = [w for w in ws if w.id != "w2"]
    after = {s: pol.choose(survivors, ctx(session_key=s)).id for s in before}
    assert all(after[s] == w for s, w in before.items() if w != "w2")


def test_prefix_index_matches_longest_prefix_and_is_bounded():
    idx = PrefixIndex(capacity=5)
    keys = [bytes([i]) * 16 for i in range(4)]
    idx.record(keys[:3], "a")
    idx.record(keys[:1], "b")
    assert idx.match(keys, ["a", "b", "c"]) == {"a": 3, "b": 1, "c": 0}
    idx.record([bytes([9]) * 16, bytes([8]) * 16, bytes([7]) * 16], "c")
    assert len(idx) == 5  # LRU evicted the oldest keys
    assert idx.match(keys, ["a"])["a"] < 3


def test_cache_aware_picks_longest_cached_prefix_with_load_guard():
    _, ws = make_registry(3)
    idx = PrefixIndex(100)
    info = token_info("m", list(range(100)), chunk_tokens=10)
    idx.record(info.keys[:6], "w1")
    idx.record(info.keys[:2], "w2")
    pol = CacheAware(idx, max_load_imbalance=4, seed=0)
    assert pol.choose(ws, ctx(prompt=info)).id == "w1"
    # a tier lookup that knows more wins
    assert pol.choose(ws, ctx(prompt=info, tier_cached={"w0": 90})).id == "w0"
    ws[1].in_flight = 10  # w1 is overloaded compared with the least loaded (0): take the least loaded
    assert pol.choose(ws, ctx(prompt=info)).id in ("w0", "w2")
    assert pol.choose(ws[:1], ctx(prompt=info)).id == "w0"
    assert make_policy("cache_aware", idx).needs_prompt
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random")


def test_token_keys_chain_and_model_seed():
    a = token_keys(model_seed("m"), list(range(25)), 10)
    b = token_keys(model_seed("m"), list(range(20)) + [99] * 5, 10)
    assert len(a) == 2 and a == b  # only full chunks; the partial tail has no key
    c = token_keys(model_seed("m"), [1, *range(1, 25)], 10)
    assert c[0] != a[0] and c[1] != a[1]  # chained: a change early changes every later key
    assert token_keys(model_seed("other"), list(range(25)), 10) != a


def test_text_keys_cover_the_whole_templated_prompt():
    sys_msg = {"role": "system", "content": "s" * 600}
    one = {"messages": [sys_msg, {"role": "user", "content": "first question " * 40}]}
    two = {"messages": [sys_msg, {"role": "user", "content": "other question " * 40}]}
    k1, k2 = text_info("m", one, 128).keys, text_info("m", two, 128).keys
    assert k1[:4] == k2[:4] and k1[-1] != k2[-1]  # shared system prompt, different later turns
    with_tools = {**one, "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert text_info("m", with_tools, 128).keys[0] != k1[0]  # tools are rendered before the messages
    assert "<|user|>" in templated_text(one)
    assert templated_text({"prompt": "abc"}) == "abc"


def test_breaker_opens_half_opens_and_closes():
    clock = Clock()
    b = CircuitBreaker(failures=2, open_s=5, max_open_s=12, clock=clock)
    b.record_failure()
    assert b.state == "closed" and b.allows()
    b.record_failure()
    assert b.state == "open" and not b.try_acquire()
    clock.t += 5
    assert b.state == "half_open"
    assert b.try_acquire() and not b.try_acquire()  # exactly one trial
    b.record_failure()  # trial failed: reopen, interval doubled
    assert b.state == "open"
    clock.t += 5
    assert b.state == "open"
    clock.t += 5
    assert b.try_acquire()
    b.record_success()
    assert b.state == "closed" and b.consecutive_failures == 0
    b.trip()
    assert b.state == "open"


def test_registry_panic_mode_and_static_sync():
    clock = Clock()
    reg, ws = make_registry(2, clock)
    reg.mark_failed(ws[0], hard=True)
    assert [w.id for w in reg.candidates("prefill", "m")] == ["w1"]
    reg.mark_failed(ws[1], hard=True)
    assert len(reg.candidates("prefill", "m")) == 2  # panic: all open -> try them anyway
    assert reg.healthy_count("prefill") == 0
    infos = [
        WorkerRegistration(worker_id=f"dns:x:1:{i}", role="decode", url=f"http://10.0.0.{i}:1", models=["m"])
        for i in (1, 2)
    ]
    reg.sync_source("dns", infos, scope="dns:x:1:")
    assert len(reg.candidates("decode", "m")) == 2
    assert reg.sync_source("dns", infos[:1], scope="dns:x:1:") == ["dns:x:1:2"]
    d = reg.get("dns:x:1:1")
    assert reg.set_probe(d, False, unhealthy_after=2) is False
    assert reg.set_probe(d, False, unhealthy_after=2) is True
    assert reg.candidates("decode", "m") == []
    clock.t += 10_000
    assert reg.expire() == ["w0", "w1"]  # static/DNS workers have no heartbeat to expire
    assert reg.get("dns:x:1:1") is not None


def test_token_bucket_and_limiter():
    clock = Clock()
    bucket = TokenBucket(2.0, 2.0, clock)
    assert bucket.take() == 0 and bucket.take() == 0
    assert bucket.take() == pytest.approx(0.5)
    clock.t += 0.5
    assert bucket.take() == 0

    lim = Limiter(LimitsConfig(per_key_max_concurrency=1, per_key_rate_per_s=1, per_key_burst=2), clock)
    p = lim.admit("a")
    with pytest.raises(OpenAIError) as e:
        lim.admit("a")
    assert e.value.status == 429 and e.value.code == "concurrency_limit_exceeded"
    assert e.value.headers == {"Retry-After": "1"}
    lim.admit("b").release()
    p.release()
    p.release()  # idempotent
    lim.admit("a").release()
    with pytest.raises(OpenAIError) as e:
        lim.admit("a")  # burst of 2 used
    assert e.value.code == "rate_limit_exceeded" and int(e.value.headers["Retry-After"]) >= 1
    glob = Limiter(LimitsConfig(max_concurrency=2), clock)
    permits = [glob.admit(""), glob.admit("")]
    with pytest.raises(OpenAIError):
        glob.admit("")
    permits[0].release()
    glob.admit("")


def test_new_config_sections_from_yaml_and_env(tmp_path, monkeypatch):
    f = tmp_path / "r.yaml"
    f.write_text(
        "router:\n"
        "  policies: {prefill: cache_aware, decode: power_of_two}\n"
        "  model_policies: {big: {prefill: session_affinity}}\n"
        "  discovery:\n"
        "    static: [{url: 'http://10.0.0.1:8100', role: prefill, models: [m]}]\n"
        "    dns: [{name: decoder, port: 8200, role: decode, models: [m]}]\n"
        "  limits: {rate_per_s: 5}\n"
    )
    monkeypatch.setenv("PDMESH_ROUTER_LIMITS_PER_KEY_MAX_CONCURRENCY", "3")
    monkeypatch.setenv("PDMESH_ROUTER_CONDITIONAL_PD_MIN_UNCACHED_TOKENS", "64")
    cfg = load_router_config(f)
    assert cfg.pool_policy("m", "prefill") == "cache_aware"
    assert cfg.pool_policy("big", "prefill") == "session_affinity"
    assert cfg.pool_policy("big", "decode") == "cache_aware"  # the default
    assert (cfg.limits.rate_per_s, cfg.limits.per_key_max_concurrency) == (5, 3)
    assert cfg.conditional_pd.min_uncached_tokens == 64
    assert cfg.breaker.open_s == cfg.failure_cooldown_s


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("router:\n  policies: {prefill: fastest}\n", "policies.prefill"),
        ("router:\n  discovery: {static: [{url: 'ftp://x', role: prefill, models: [m]}]}\n", "url"),
        ("router:\n  limits: {rate_per_s: -1}\n", "limits.rate_per_s"),
        ("router:\n  breaker: {failures: 0}\n", "breaker.failures"),
        ("router:\n  retry: {backoff_s: 1, backoff_max_s: 0.1}\n", "backoff_max_s"),
        ("router:\n  cache_aware: {tokenizer: magic}\n", "cache_aware.tokenizer"),
    ],
)
def test_bad_new_sections_name_the_field(tmp_path, text, needle):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(RouterConfigError, match=needle):
        load_router_config(f)
