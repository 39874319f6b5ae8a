"""The planner's live inputs: vLLM's metrics pages parsed, interval points formed, service times fitted."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdmesh.plan_live import NotEnoughTraffic, Points, engine_values, fit_profile, router_values
from pdmesh.planner import WorkerProfile, prefill_seconds


def _engine_page(
    prefill: list[float], computed: int, cached: int, itl: list[float], generated: int, running: int
):
    """A /metrics page with vLLM's metric names and label sets (two engines behind one server, as DP does)."""
    r = CollectorRegistry()
    pt = Histogram("vllm:request_prefill_time_seconds", "", ["engine"], registry=r)
    src = Counter("vllm:prompt_tokens_by_source", "", ["engine", "source"], registry=r)
    il = Histogram("vllm:inter_token_latency_seconds", "", ["engine"], registry=r)
    gen = Counter("vllm:generation_tokens", "", ["engine"], registry=r)
    run = Gauge("vllm:num_requests_running", "", ["engine"], registry=r)
    for i, v in enumerate(prefill):
        pt.labels(engine=str(i % 2)).observe(v)
    src.labels(engine="0", source="local_compute").inc(computed)
    src.labels(engine="1", source="local_cache_hit").inc(cached)
    src.labels(engine="1", source="external_kv_transfer").inc(7)
    for i, v in enumerate(itl):
        il.labels(engine=str(i % 2)).observe(v)
    gen.labels(engine="0").inc(generated)
    run.labels(engine="0").set(running)
    run.labels(engine="1").set(1)
    return generate_latest(r).decode()


def test_engine_values_sum_engines_and_pick_local_compute():
    v = engine_values(_engine_page([0.1, 0.3], 900, 100, [0.01, 0.02, 0.03], 48, 3))
    assert v["prefill_n"] == 2 and v["prefill_s"] == pytest.approx(0.4)
    assert v["computed_tokens"] == 900  # cache hits and transferred tokens are not computed work
    assert v["itl_n"] == 3 and v["itl_s"] == pytest.approx(0.06)
    assert v["generated"] == 48 and v["running"] == 4


def test_router_values_count_only_successes():
    r = CollectorRegistry()
    req = Counter("pdmesh_router_requests", "", ["endpoint", "status"], registry=r)
    req.labels(endpoint="/v1/completions", status="200").inc(5)
    req.labels(endpoint="/v1/chat/completions", status="200").inc(2)
    req.labels(endpoint="/v1/completions", status="400").inc(9)
    req.labels(endpoint="/tokenize", status="200").inc(40)  # passthrough: no generation, not load to plan for
    Counter("pdmesh_router_prompt_tokens", "", registry=r).inc(7000)
    assert router_values(generate_latest(r).decode()) == {"requests": 7, "prompt_tokens": 7000}


def _interval(points: Points, role: str, before: dict, after: dict) -> None:
    base = dict.fromkeys(
        (
            "prefill_s",
            "prefill_n",
            "computed_tokens",
            "prompt_tokens",
            "itl_s",
            "itl_n",
            "generated",
            "running",
        ),
        0,
    )
    points.add_interval(role, {**base, **before}, {**base, **after})


def test_fit_recovers_the_service_times_that_made_the_points():
    true = WorkerProfile(4000.0, 0.02, 0.006, 0.0004)
    points = Points()
    for tokens, n in ((200, 3), (800, 2), (1600, 4)):  # per interval: n prompts of `tokens`
        secs = n * (true.prefill_overhead_s + tokens / true.prefill_tokens_per_s)
        _interval(points, "prefill", {}, {"prefill_s": secs, "prefill_n": n, "computed_tokens": tokens * n})
    for running in (1, 6, 16):
        itl = true.decode_step_s + true.decode_step_per_seq_s * running
        _interval(
            points, "decode", {"running": running}, {"running": running, "itl_s": 50 * itl, "itl_n": 50}
        )
    for tokens in (200, 1600):  # the decode engine taking in pushed KV: 2 ms + 10 us per token
        load = {"prefill_n": 2, "prefill_s": 2 * (0.002 + 1e-5 * tokens), "prompt_tokens": 2 * tokens}
        _interval(points, "decode", {}, {**load, "computed_tokens": 2})
    fitted = fit_profile(points)
    assert fitted.assumed == () and (fitted.prefill_points, fitted.decode_points) == (3, 3)
    got = fitted.profile
    assert got.prefill_tokens_per_s == pytest.approx(4000, rel=1e-6)
    assert got.prefill_overhead_s == pytest.approx(0.02, rel=1e-6)
    assert got.decode_step_s == pytest.approx(0.006, rel=1e-6)
    assert got.decode_step_per_seq_s == pytest.approx(0.0004, rel=1e-6)
    assert got.decode_load_s == pytest.approx(0.002, rel=1e-6)
    assert got.decode_load_per_token_s == pytest.approx(1e-5, rel=1e-6)
    assert len(points.prefill) == 3  # the decode engine's prefill time is a load point, not a prefill point


def test_fit_recovers_an_attention_term_that_grows_with_the_square_of_the_prompt():
    # 10 ms + 75 us per token + 25 ns per token x prompt token: 2048 tokens cost 4x a linear extrapolation's growth
    true = WorkerProfile(1 / 75e-6, 0.01, 0.006, 0.0, prefill_attention_s_per_token2=2.5e-8)
    points = Points()
    for tokens in (128, 512, 1024, 2048):
        secs = 4 * prefill_seconds(true, tokens, tokens)
        _interval(points, "prefill", {}, {"prefill_s": secs, "prefill_n": 4, "computed_tokens": 4 * tokens})
    _interval(points, "decode", {"running": 1}, {"running": 1, "itl_s": 0.006, "itl_n": 1})
    got = fit_profile(points).profile
    assert got.prefill_overhead_s == pytest.approx(0.01, rel=1e-6)
    assert got.prefill_tokens_per_s == pytest.approx(1 / 75e-6, rel=1e-6)
    assert got.prefill_attention_s_per_token2 == pytest.approx(2.5e-8, rel=1e-6)
    # two lengths only: no attention term (here the line tilts below zero, so the mean: the same total time)
    two = Points()
    for tokens in (512, 2048):
        secs = prefill_seconds(true, tokens, tokens)
        _interval(two, "prefill", {}, {"prefill_s": secs, "prefill_n": 1, "computed_tokens": tokens})
    _interval(two, "decode", {"running": 1}, {"running": 1, "itl_s": 0.006, "itl_n": 1})
    line = fit_profile(two).profile
    assert line.prefill_attention_s_per_token2 == 0
    total = sum(prefill_seconds(true, t, t) for t in (512, 2048))
    assert sum(prefill_seconds(line, t, t) for t in (512, 2048)) == pytest.approx(total)


def test_the_attention_term_counts_computed_tokens_against_the_whole_prompt_with_prefix_hits():
    """A window with prefix hits: computed tokens attend to the cached prefix too; fitting against computed tokens
    squared would come out high by 1 / (1 - hit rate), the whole-prompt regressor recovers the true term."""
    true = WorkerProfile(1 / 75e-6, 0.01, 0.006, 0.0, prefill_attention_s_per_token2=2.5e-8)
    points = Points()
    for computed, prompt in ((128, 512), (512, 2048), (1024, 1024), (2048, 4096), (700, 2800)):
        secs = 3 * prefill_seconds(true, computed, prompt)
        _interval(points, "prefill", {}, {"prefill_s": secs, "prefill_n": 3, "computed_tokens": 3 * computed,
                  "prompt_tokens": 3 * prompt})  # fmt: skip
    _interval(points, "decode", {"running": 1}, {"running": 1, "itl_s": 0.006, "itl_n": 1})
    got = fit_profile(points).profile
    assert got.prefill_attention_s_per_token2 == pytest.approx(2.5e-8, rel=1e-6)
    assert got.prefill_tokens_per_s == pytest.approx(1 / 75e-6, rel=1e-6)
    assert got.prefill_overhead_s == pytest.approx(0.01, rel=1e-6)


def test_prompts_of_one_length_with_varying_hits_give_no_attention_term():
    """Every prompt ~4096 tokens, only the hits varying: computed x prompt is computed times a constant, the
    attention term cannot be told from the per-token one, so none is fitted (a line instead)."""
    true = WorkerProfile(1 / 75e-6, 0.01, 0.006, 0.0, prefill_attention_s_per_token2=2.5e-8)
    points = Points()
    for computed, prompt in ((200, 4090), (800, 4100), (1600, 4080), (3000, 4110)):
        secs = 2 * prefill_seconds(true, computed, prompt)
        _interval(points, "prefill", {}, {"prefill_s": secs, "prefill_n": 2, "computed_tokens": 2 * computed,
                  "prompt_tokens": 2 * prompt})  # fmt: skip
    _interval(points, "decode", {"running": 1}, {"running": 1, "itl_s": 0.006, "itl_n": 1})
    got = fit_profile(points).profile
    assert got.prefill_attention_s_per_token2 == 0
    for computed, prompt in ((200, 4090), (3000, 4110)):  # the line still predicts these prefills
        assert prefill_seconds(got, computed, prompt) == pytest.approx(
            prefill_seconds(true, computed, prompt), rel=0.02
        )


def test_without_spread_the_slopes_come_from_the_base_profile():
    base = WorkerProfile(1000.0, 0.05, 0.01, 0.001, transfer_s=0.003)
    points = Points()
    for _ in range(3):  # same prompt length and batch every interval: only the means are measured
        _interval(points, "both", {"running": 4}, {"running": 4, "prefill_s": 2 * 0.25, "prefill_n": 2,
                  "computed_tokens": 2 * 500, "itl_s": 10 * 0.012, "itl_n": 10})  # fmt: skip
    fitted = fit_profile(points, base)
    assert set(fitted.assumed) == {"prefill_overhead_s", "decode_step_per_seq_s", "decode_load_s"}
    got = fitted.profile
    assert got.prefill_overhead_s == 0.05 and got.prefill_tokens_per_s == pytest.approx(500 / 0.2)
    assert got.decode_step_per_seq_s == 0.001 and got.decode_step_s == pytest.approx(0.012 - 4 * 0.001)
    assert got.transfer_s == 0.003
    no_base = fit_profile(points).profile
    assert no_base.prefill_overhead_s == 0 and no_base.prefill_tokens_per_s == pytest.approx(500 / 0.25)


def test_an_idle_window_is_not_enough_traffic():
    points = Points()
    _interval(points, "prefill", {"prefill_n": 4}, {"prefill_n": 4})  # nothing finished in the interval
    with pytest.raises(NotEnoughTraffic, match="prefill"):
        fit_profile(points)
    _interval(points, "prefill", {}, {"prefill_n": 1, "prefill_s": 0.1, "computed_tokens": 100})
    with pytest.raises(NotEnoughTraffic, match="decode"):
        fit_profile(points)


def test_plan_from_a_router_that_cannot_answer_is_a_clear_error(capsys, monkeypatch):
    """No router there, a malformed URL, a router without workers: exit 2 with one line saying why, no trace."""
    from pdmesh.cli import main
    from pdmesh.procs import free_port
    from pdmesh.router.app import create_app
    from pdmesh.router.config import RouterConfig
    from tests.servers import ThreadServer

    monkeypatch.delenv("PDMESH_CLUSTER_TOKEN", raising=False)
    slo = ["--ttft-slo", "1", "--itl-slo", "0.1", "--window", "1"]
    assert main(["plan", "--from-router", f"http://127.0.0.1:{free_port()}", *slo]) == 2
    assert "cannot read the cluster's metrics" in capsys.readouterr().err
    assert main(["plan", "--from-router", "router:8000", *slo]) == 2
    assert "router URL must be http(s)://" in capsys.readouterr().err
    router = ThreadServer(create_app(RouterConfig())).start()
    try:
        assert main(["plan", "--from-router", router.url, *slo]) == 2
        assert "lists no healthy worker" in capsys.readouterr().err
    finally:
        router.stop()
    assert main(["plan", "--ttft-slo", "1", "--itl-slo", "1"]) == 2  # neither --profile nor --from-router
    assert "--profile FILE or --from-router URL" in capsys.readouterr().err
