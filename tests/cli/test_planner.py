"""The planner's formulas against the discrete-event model of the same pools, and the plan it picks."""

from __future__ import annotations

import json
import math

import pytest

from pdmesh.cli import main
from pdmesh.plan_sim import simulate
from pdmesh.planner import WorkerProfile, Workload, plan, predict

PROFILE = WorkerProfile(
    prefill_tokens_per_s=4000, prefill_overhead_s=0.02, decode_step_s=0.02, decode_step_per_seq_s=0.002,
    transfer_s=0.01,
)  # fmt: skip


@pytest.mark.parametrize(
    "rate, prompt, out, hit, cv2, p, d, cores",
    [
        (4, 800, 32, 0.0, 0.0, 1, 1, None),
        (8, 800, 32, 0.0, 0.0, 2, 1, None),
        (3, 800, 32, 0.0, 0.0, 1, 2, None),
        (8, 2000, 16, 0.6, 0.5, 2, 1, None),
        (2, 800, 64, 0.0, 1.0, 1, 1, 1.0),  # two workers on one core: every service twice as long
        (6, 400, 128, 0.0, 0.0, 1, 3, None),
    ],
)
def test_predictions_match_the_event_simulation(rate, prompt, out, hit, cv2, p, d, cores):
    w = Workload(rate, prompt, out, hit, cv2)
    pred = predict(PROFILE, w, p, d, cores)
    assert pred.stable
    sim = simulate(PROFILE, w, p, d, requests=8000, cores=cores, seed=3).summary()
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
    for p, d, out in ((1, 1, 32), (1, 2, 32), (2, 1, 200)):
        w = Workload(1.0, 800, out)
        cap = predict(PROFILE, w, p, d).max_rate
        sim = simulate(PROFILE, w, p, d, requests=3000, seed=2, closed_loop=512)
        assert sim.throughput == pytest.approx(cap, rel=0.1), (p, d)


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
    out = json.loads(capsys.readouterr().out)
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
