"""`pdmesh up` supervision: a child that exits is restarted with the same command; a crash loop stops it."""

from __future__ import annotations

import logging
import time

import pytest

from pdmesh.cluster import MAX_RESTARTS, ClusterSpec, LocalCluster


def test_supervise_restarts_exited_children_and_gives_up_on_a_crash_loop(tmp_path):
    c = LocalCluster(ClusterSpec(log_dir=str(tmp_path)))
    try:
        # a child that always exits at once (a bad flag: argparse exits 2)
        c.workers["decode-0"] = c._spawn("decode-0", ["--log-level", "bogus"], tmp_path / "decode-0.log")
        restarted = 0
        deadline = time.monotonic() + 90
        with pytest.raises(RuntimeError, match=r"decode-0 exited \d+ times") as e:
            while time.monotonic() < deadline:
                if not c.workers["decode-0"].alive():
                    restarted += len(c.supervise())
                time.sleep(0.05)
        assert restarted == MAX_RESTARTS
        assert "invalid choice" in str(e.value)  # the last log lines say why
    finally:
        c.stop()


def test_supervise_leaves_running_children_alone(tmp_path):
    c = LocalCluster(ClusterSpec(log_dir=str(tmp_path)))
    try:
        c.workers["w"] = c._spawn(
            "w", ["cache-server", "--host", "127.0.0.1", "--port", "0"], tmp_path / "w.log"
        )
        time.sleep(1.0)
        first = c.workers["w"]
        assert c.supervise() == [] and c.workers["w"] is first
        first.proc.kill()
        first.proc.wait(10)
        assert c.supervise() == ["w"] and c.workers["w"] is not first and c.workers["w"].alive()
    finally:
        c.stop()


def test_supervise_backs_off_while_a_child_keeps_failing_and_logs_its_last_lines(tmp_path, caplog):
    """The first exit restarts at once; while the child keeps dying right after its start the restarts wait
    1 s, 2 s, ... (CLUSTER_RESTART_POLICY); every exit is logged with the child's last log lines."""
    caplog.set_level(logging.WARNING, logger="pdmesh.cluster")
    c = LocalCluster(ClusterSpec(log_dir=str(tmp_path)))
    try:
        c.workers["decode-0"] = c._spawn("decode-0", ["--log-level", "bogus"], tmp_path / "decode-0.log")
        died: list[float] = []
        restarts: list[float] = []
        deadline = time.monotonic() + 60
        while len(restarts) < 3 and time.monotonic() < deadline:
            proc = c.workers["decode-0"]
            if not proc.alive():
                if not died or died[-1] < (restarts[-1] if restarts else 0):
                    died.append(time.monotonic())
                if c.supervise():
                    restarts.append(time.monotonic())
            time.sleep(0.02)
        assert len(restarts) == 3
        assert restarts[0] - died[0] < 0.5  # at once
        assert restarts[1] - died[1] >= 1.0 - 0.05 and restarts[2] - died[2] >= 2.0 - 0.05
        exits = [r.getMessage() for r in caplog.records if "decode-0 exited" in r.getMessage()]
        assert len(exits) == 3 and all("invalid choice" in m for m in exits)
        assert [m.split("restarting it in ")[1].split("s.")[0] for m in exits] == ["0", "1", "2"]
    finally:
        c.stop()
