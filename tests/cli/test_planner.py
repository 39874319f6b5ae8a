"""The planner's formulas against the discrete-event model of the same pools, and the plan it picks."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from pdmesh.cli import main
from pdmesh.placement import core_plan
from pdmesh.plan_sim import simulate
from pdmesh.planner import WorkerProfile, Workload, capacity, core_sharing, plan, predict, prefill_seconds

PROFILE = WorkerProfile(
    prefill_tokens_per_s=4000, prefill_overhead_s=0.02, decode_step_s=0.02, decode_step_per_seq_s=0.002,
    transfer_s=0.01,
)  # fmt: skip


LOADING = dataclasses.replace(
    PROFILE, decode_load_s=0.01, decode_load_per_token_s=2e-5
)  # 26 ms at 800 tokens
ATTENTION = dataclasses.replace(
    PROFILE, prefill_attention_s_per_token2=5e-8
)  # 32 ms more at 800 fresh tokens


def test_the_attention_term_counts_computed_tokens_against_the_whole_prompt():
    assert prefill_seconds(ATTENTION, 800, 800) == pytest.approx(0.02 + 0.2 + 0.032)
    # half the prompt cached: half the tokens computed, each still attending to all 800
    assert prefill_seconds(ATTENTION, 400, 800) == pytest.approx(0.02 + 0.1 + 0.016)
    long, short = Workload(1.0, 4000, 16), Workload(1.0, 1000, 16)
    # 4x the prompt costs more than 4x the prefill time: capacity falls faster than 1/length
    ratio = capacity(ATTENTION, short, 1, 4) / capacity(ATTENTION, long, 1, 4)
    assert ratio > 4.5 and capacity(PROFILE, short, 1, 4) / capacity(PROFILE, long, 1, 4) < 4


@pytest.mark.parametrize(
    "profile, rate, prompt, out, hit, cv2, p, d, cores",
    [
        (PROFILE, 4, 800, 32, 0.0, 0.0, 1, 1, None),
        (PROFILE, 8, 800, 32, 0.0, 0.0, 2, 1, None),
        (PROFILE, 3, 800, 32, 0.0, 0.0, 1, 2, None),
        (PROFILE, 8, 2000, 16, 0.6, 0.5, 2, 1, None),
        (PROFILE, 2, 800, 64, 0.0, 1.0, 1, 1, 1.0),  # two workers on one core: every service twice as long
        (PROFILE, 6, 400, 128, 0.0, 0.0, 1, 3, None),
        (PROFILE, 3, 800, 32, 0.0, 0.0, 1, 2, 2.0),  # the two decode workers share core 1
        (PROFILE, 1.6, 800, 32, 0.0, 0.0, 1, 1, 1.0),  # one core for both
        (LOADING, 4, 800, 32, 0.0, 0.0, 1, 1, None),
        (ATTENTION, 5, 800, 32, 0.0, 0.0, 2, 1, None),
    ],
)
def test_predictions_match_the_event_simulation(profile, rate, prompt, out, hit, cv2, p, d, cores):
    w = Workload(rate, prompt, out, hit, cv2)
    pred = predict(profile, w, p, d, cores)
    assert pred.stable
    sim = simulate(profile, w, p, d, requests=8000, cores=cores, seed=3).summary()
    assert sim["throughput"] == pytest.approx(rate, rel=0.05)  # stable: it keeps up with the arrivals
    assert sim["itl_mean_s"] == pytest.approx(pred.itl_s, rel=0.1)
    assert sim["ttft_p50_s"] == pytest.approx(pred.ttft_p50_s, rel=0.2, abs=0.02)
    assert sim["ttft_p90_s"] == pytest.approx(pred.ttft_p90_s, rel=0.2, abs=0.02)


def test_an_overloaded_pool_is_predicted_unstable_and_falls_behind():
    w = Workload(6, 800, 32)  # one prefill worker serves at most 1 / 0.22 s = 4.5 requests/s
    pred = predict(PROFILE, w, 1, 1)
    assert not pred.stable and math.isinf(pred.ttft_p90_s)
    assert pred.max_rate == pytest.approx(1 / 0.22)
    sim = simulate(PROFILE, w, 1, 1, requests=4000, seed=1)
    assert sim.throughput == pytest.approx(pred.max_rate, rel=0.05)  # capped at the predicted capacity
    assert sim.summary()["ttft_p90_s"] > 10


def test_closed_loop_saturation_reaches_the_predicted_capacity():
    """Including engines sharing cores (prefill servers of two speeds) and decode-bound pools with KV loads
    (a finite batch never quite reaches the decode capacity: more requests, fewer clients)."""
    cases = [(PROFILE, 1, 1, 32, None, 512, 3000), (PROFILE, 1, 2, 32, None, 512, 3000),
             (PROFILE, 2, 1, 200, None, 512, 3000), (PROFILE, 1, 2, 32, 2.0, 512, 3000),
             (PROFILE, 2, 1, 32, 2.0, 512, 3000), (LOADING, 3, 1, 64, None, 128, 12000)]  # fmt: skip
    for profile, p, d, out, cores, clients, requests in cases:
        w = Workload(1.0, 800, out)
        cap = predict(profile, w, p, d, cores).max_rate
        sim = simulate(profile, w, p, d, requests=requests, seed=2, closed_loop=clients, cores=cores)
        assert sim.throughput == pytest.approx(cap, rel=0.1), (p, d, cores)


def test_engines_are_placed_on_cores_as_pdmesh_up_pins_them():
    """Prefill workers get cores of their own first, decode workers share the rest; the planner reads the same
    plan (pdmesh.placement) that LocalCluster pins the engines by."""
    assert core_plan(1, 1, 2) == ([0], [1])
    assert core_plan(1, 2, 2) == ([0], [1, 1])
    assert core_plan(1, 3, 4) == ([0], [1, 2, 3])
    assert core_plan(2, 1, 2) == ([0, 1], [0])  # prefill alone fills the cores: round robin over all
    assert core_plan(3, 2, 2) == ([0, 1, 0], [1, 0])
    assert core_plan(2, 2, 1) == ([0, 0], [0, 0])
    assert core_sharing(1, 2, 2.0) == ([1], [2, 2])
    assert core_sharing(2, 1, 2.0) == ([2, 1], [2])  # prefill-0 and decode-0 on core 0
    assert core_sharing(3, 3, None) == ([1, 1, 1], [1, 1, 1])  # each worker on its own hardware
    shared = predict(PROFILE, Workload(1.0, 800, 32), 2, 1, 2.0)
    own = predict(PROFILE, Workload(1.0, 800, 32), 2, 1)
    assert shared.max_rate == pytest.approx(own.max_rate * 1.5 / 2)  # prefill-0 has half a core


def test_plan_is_the_cheapest_configuration_that_meets_the_slos():
    w = Workload(9, 800, 32)
    best = plan(PROFILE, w, ttft_slo_s=0.6, itl_slo_s=0.04)
    assert best is not None and best.ttft_p90_s <= 0.6 and best.itl_s <= 0.04
    for total in range(2, best.prefill + best.decode):
        for p in range(1, total):
            alt = predict(PROFILE, w, p, total - p)
            assert not (alt.stable and alt.ttft_p90_s <= 0.6 and alt.itl_s <= 0.04)
    sim = simulate(PROFILE, w, best.prefill, best.decode, requests=8000, seed=4).summary()
    assert sim["ttft_p90_s"] <= 0.6 * 1.2 and sim["itl_mean_s"] <= 0.04 * 1.1
    assert plan(PROFILE, w, ttft_slo_s=0.001, itl_slo_s=0.04, max_workers=8) is None


def test_pdmesh_plan_cli(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"profile": PROFILE.__dict__}))
    args = [
        "plan",
        "--profile",
        str(profile),
        "--rate",
        "9",
        "--prompt-tokens",
        "800",
        "--output-tokens",
        "32",
    ]
    assert main([*args, "--ttft-slo", "0.6", "--itl-slo", "0.04"]) == 0
    out = json.loads(capsys.readouterr().out)["plan"]
    assert out["prefill"] >= 2 and out["decode"] >= 1 and out["ttft_p90_s"] <= 0.6
    assert main([*args, "--ttft-slo", "0.001", "--itl-slo", "0.04", "--max-workers", "6"]) == 1
    assert main([*args, "--ttft-slo", "1", "--itl-slo", "1", "--hit-rate", "1.5"]) == 2
    assert (
        main(
            [
                "plan",
                "--profile",
                str(tmp_path / "missing.json"),
                *args[3:],
                "--ttft-slo",
                "1",
                "--itl-slo",
                "1",
            ]
        )
        == 2
    )


def test_host_work_on_shared_cores_lowers_the_capacity():
    """On one machine the router, API servers and tiers take CPU per request from the engines' cores."""
    w = Workload(1.0, 800, 32)
    pools = predict(PROFILE, w, 1, 1, 2.0).max_rate
    hosted = dataclasses.replace(PROFILE, host_cpu_per_request_s=0.05)
    assert predict(hosted, w, 1, 1).max_rate == pools  # own hardware: the host's work is elsewhere
    assert capacity(hosted, w, 1, 1, 2.0) == pytest.approx(pools / (1 + 0.05 * pools / 2))
    # at that rate the engines keep 1 - host * rate / cores of their cores: the pools are just saturated
    x = capacity(hosted, w, 2, 1, 2.0)
    at_x = predict(hosted, Workload(x * 0.999, 800, 32), 2, 1, 2.0)
    assert at_x.stable and at_x.prefill_utilization == pytest.approx(1.0, abs=0.01)
    slow = predict(hosted, Workload(3.0, 800, 32), 1, 1, 2.0)
    fast = predict(PROFILE, Workload(3.0, 800, 32), 1, 1, 2.0)
    assert slow.stable and slow.ttft_p50_s > fast.ttft_p50_s and slow.itl_s > fast.itl_s
