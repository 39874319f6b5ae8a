"""The one restart policy (pdmesh.restart_policy) on a fake clock: backoff, reset, crash-loop rules, log tails,
and the named policies of the four supervisors."""

from __future__ import annotations

import pytest

from pdmesh.cluster import CLUSTER_RESTART_POLICY, MAX_RESTARTS, RESTART_WINDOW_S
from pdmesh.restart_policy import CrashLoop, RestartPolicy, RestartTracker, log_tail
from pdmesh.router.processes import ROUTER_RESTART_POLICY
from pdmesh.worker import supervision
from pdmesh.worker.supervision import ENGINE_RESTART_POLICY, TIER_RESTART_POLICY


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _tracker(policy: RestartPolicy, name: str = "child") -> tuple[RestartTracker, Clock]:
    clock = Clock()
    return RestartTracker(policy, clock, name=name), clock


def test_failed_starts_back_off_doubling_up_to_the_cap_and_become_due_after_the_delay():
    t, clock = _tracker(RestartPolicy(first_delay_s=1.0, max_delay_s=30.0, factor=2.0))
    assert t.due()  # nothing failed yet
    delays = []
    for _ in range(8):
        assert t.next_delay == RestartPolicy().delay(t.failures_in_a_row + 1)
        delays.append(t.start_failed("boom"))
        assert not t.due() and t.wait_s() == delays[-1]
        clock.now += delays[-1] - 0.01
        assert not t.due()
        clock.now += 0.01
        assert t.due() and t.wait_s() == 0
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert t.failures_in_a_row == 8


def test_a_child_that_proved_healthy_restarts_at_once_and_its_backoff_starts_over():
    t, clock = _tracker(RestartPolicy())
    t.started()
    assert [t.start_failed(), t.start_failed(), t.start_failed()] == [1, 2, 4]
    t.started()
    t.healthy()
    assert t.failures_in_a_row == 0
    clock.now += 1
    assert t.exited("exit 137") == 0 and t.due()  # it ran and proved good: at once
    t.started()
    assert t.start_failed() == 1  # the backoff starts over


def test_an_exit_before_the_child_proved_good_is_a_failed_start():
    t, clock = _tracker(RestartPolicy())
    t.started()
    assert t.exited("exit 1") == 1  # no healthy() since its start: it failed to start
    clock.now += 1
    t.started()
    assert t.exited("exit 1") == 2


def test_quick_s_decides_what_a_failed_start_is_for_children_without_a_readiness_check():
    t, clock = _tracker(RestartPolicy(quick_s=10.0))
    t.started()
    clock.now += 3
    assert t.exited() == 1  # exited within 10 s of its start
    clock.now += 1
    t.started()
    clock.now += 9.9
    assert t.exited() == 2
    clock.now += 2
    t.started()
    clock.now += 10
    assert t.exited() == 0 and t.failures_in_a_row == 0  # it ran 10 s: it proved good


def test_at_once_restarts_the_first_failures_without_a_wait():
    t, clock = _tracker(RestartPolicy(at_once=1))
    out = []
    for _ in range(5):
        t.started()
        out.append(t.exited())
        clock.now += out[-1]
    assert out == [0, 1, 2, 4, 8]


def test_more_than_max_exits_within_the_window_is_a_crash_loop():
    t, clock = _tracker(RestartPolicy(max_exits=3, window_s=60.0), name="decode-0")
    for _ in range(3):
        t.healthy()
        t.exited("last code 1")
        clock.now += 10
    t.healthy()
    with pytest.raises(
        CrashLoop, match=r"decode-0 exited 4 times within 60s \(last code 2\); giving up"
    ) as e:
        t.exited("last code 2", last_log="line 1\nline 2")
    assert str(e.value).endswith("Its last log lines:\nline 1\nline 2")
    assert isinstance(e.value, RuntimeError)


def test_the_window_slides_exits_older_than_it_do_not_count():
    t, clock = _tracker(RestartPolicy(max_exits=3, window_s=60.0))
    for _ in range(20):  # one exit every 20 s: 3 within any 60 s, never more
        t.healthy()
        assert t.exited() == 0
        clock.now += 20


def test_failed_starts_count_towards_the_window_and_the_message_says_so():
    t, _ = _tracker(RestartPolicy(max_exits=2, window_s=900.0), name="vLLM")
    t.healthy()
    t.exited("exit 139")
    t.start_failed("restart failed")
    with pytest.raises(
        CrashLoop, match=r"vLLM exited or failed to start 3 times within 900s \(restart failed\)"
    ):
        t.start_failed("restart failed")


def test_max_failed_starts_in_a_row_gives_up_and_a_good_run_resets_the_count():
    t, clock = _tracker(RestartPolicy(quick_s=10.0, max_failed_starts=2), name="router process 1")
    t.started()
    assert t.exited() == 1
    t.started()
    clock.now += 30
    assert t.exited() == 0  # a good run between: the count starts over
    t.started()
    assert t.exited() == 1
    t.started()
    assert t.exited() == 2
    t.started()
    with pytest.raises(
        CrashLoop, match=r"router process 1 failed 3 times in a row right after starting \(exit 1\)"
    ):
        t.exited("exit 1")


def test_never_give_up_without_a_crash_loop_rule():
    t, _ = _tracker(RestartPolicy(max_exits=None, max_failed_starts=None))
    for _ in range(1000):
        t.started()
        t.exited()
        t.start_failed()
    assert t.next_delay == 30.0


def test_policies_are_frozen_and_checked():
    with pytest.raises(AttributeError):
        RestartPolicy().max_exits = 3  # type: ignore[misc]
    for bad in (
        {"first_delay_s": -1},
        {"first_delay_s": 5, "max_delay_s": 1},
        {"factor": 0.5},
        {"window_s": 0},
        {"quick_s": 0},
        {"at_once": -1},
        {"max_exits": -1},
        {"max_failed_starts": -1},
    ):
        with pytest.raises(ValueError):
            RestartPolicy(**bad)


def test_the_named_policies_of_the_four_supervisors():
    # the worker's engine: > 5 exits in 15 minutes; the tier: forever; both 1 s doubling to 30 s
    for p in (ENGINE_RESTART_POLICY, TIER_RESTART_POLICY):
        assert [p.delay(k) for k in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]
    assert (ENGINE_RESTART_POLICY.max_exits, ENGINE_RESTART_POLICY.window_s) == (5, 900.0)
    assert TIER_RESTART_POLICY.max_exits is None and TIER_RESTART_POLICY.max_failed_starts is None
    # the router parent: 1, 2, 4, 8 s after quick (< 10 s) failures, the 5th in a row gives up
    t, clock = _tracker(ROUTER_RESTART_POLICY)
    delays = []
    with pytest.raises(CrashLoop, match="failed 5 times in a row"):
        for _ in range(10):
            t.started()
            clock.now += 2
            delays.append(t.exited())
            clock.now += delays[-1]
    assert delays == [1, 2, 4, 8]
    # pdmesh up: at once, then backoff; the 6th exit within 60 s gives up
    t, clock = _tracker(CLUSTER_RESTART_POLICY)
    delays = []
    with pytest.raises(CrashLoop, match=f"exited {MAX_RESTARTS + 1} times within {RESTART_WINDOW_S:.0f}s"):
        for _ in range(10):
            t.started()
            clock.now += 0.5
            delays.append(t.exited())
            clock.now += delays[-1]
    assert delays == [0, 1, 2, 4, 8]


def test_the_old_names_still_import_from_supervision():
    assert supervision.CrashLoop is CrashLoop and supervision.log_tail is log_tail


def test_log_tail(tmp_path):
    path = tmp_path / "child.log"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_tail(path, 3) == "line 97\nline 98\nline 99"
    assert log_tail(str(path), 0) == ""
    assert log_tail(tmp_path / "missing.log") == "(no log)"
    assert log_tail(None) == "(no log)"
    big = tmp_path / "big.log"
    big.write_bytes(b"x" * 1_000_000 + b"\nsecond to last\nlast\n")
    lines = log_tail(big, 5, max_bytes=4096).splitlines()
    assert lines == ["second to last", "last"]  # the cut first line is dropped
    bad = tmp_path / "bad.log"
    bad.write_bytes(b"ok\n\xff\xfe broken\n")
    assert log_tail(bad, 1) == "\ufffd\ufffd broken"
