"""`pdmesh up` supervision: a child that exits is restarted with the same command; a crash loop stops it."""

from __future__ import annotations

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
