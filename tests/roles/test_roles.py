"""The PD roles as pure code: what a prefill leg pushes and how a decode leg waits (no vLLM, no I/O)."""

from __future__ import annotations

from pdmesh.decoder.wait import PushWait
from pdmesh.prefiller.push import PushPlan, PushSpec


def test_each_push_of_a_request_has_its_own_transfer_id_and_the_request_deadline():
    plan = PushPlan("tid", "10.0.0.2:7000", 4.5)
    assert plan.next_push() == PushSpec("tid.1", "10.0.0.2:7000", 4.5)
    assert plan.next_push() == PushSpec("tid.2", "10.0.0.2:7000", 4.5)
    assert plan.resave_loaded  # the decoder needs every chunk, also those the prefill side loaded
    assert plan.report() == {"transfer_id": "tid"}


def test_decode_waits_until_every_chunk_is_ready():
    w = PushWait("t", deadline_s=2.0, started_at=10.0)
    assert w.decide(ready=0, needed=3, now=10.0) == "wait"
    assert w.decide(ready=2, needed=3, now=11.9) == "wait"
    assert w.decide(ready=3, needed=3, now=11.95) == "load"
    assert not w.fell_back


def test_decode_falls_back_at_the_deadline_once_and_reports_it():
    w = PushWait("t", deadline_s=2.0, started_at=10.0)
    assert w.decide(ready=1, needed=3, now=10.5) == "wait"
    assert w.decide(ready=1, needed=3, now=12.4) == "wait"  # 1.9 s since the last chunk arrived
    assert w.decide(ready=1, needed=3, now=12.5) == "load"
    assert w.fell_back
    assert w.decide(ready=1, needed=3, now=12.5) == "load"  # no second wait after a fallback
    w.loaded_tokens = 128
    assert w.report() == {"transfer_id": "t", "loaded_tokens": 128, "fallback": True}


def test_a_zero_deadline_never_waits():
    w = PushWait("t", deadline_s=0.0, started_at=5.0)
    assert w.decide(ready=0, needed=1, now=5.0) == "load" and w.fell_back


def test_the_deadline_runs_from_the_last_progress():
    """The decode leg starts with the prefill leg: a long prefill that keeps pushing chunks is waited for."""
    w = PushWait("t", deadline_s=2.0, started_at=0.0)
    assert w.decide(ready=0, needed=10, now=1.9) == "wait"
    for i in range(1, 10):  # a chunk every 1.5 s: 13.5 s in all, each gap within the deadline
        assert w.decide(ready=i, needed=10, now=1.9 + 1.5 * i) == "wait"
    assert w.decide(ready=10, needed=10, now=17.0) == "load" and not w.fell_back
    stalled = PushWait("t", deadline_s=2.0, started_at=0.0)
    assert stalled.decide(ready=0, needed=3, now=2.0) == "load" and stalled.fell_back  # nothing ever came
