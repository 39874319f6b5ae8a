"""What a killed vLLM leaves in /dev/shm is removed by its owner, and nothing a live process uses
(:mod:`pdmesh.worker.shm_leftovers`); a stopped process group gets a grace for its stragglers
(:meth:`pdmesh.procs.ManagedProcess.stop`). Real processes, segments in a directory of the test's own."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pdmesh.procs import ManagedProcess, group_pids
from pdmesh.worker.shm_leftovers import remove_orphans, segments_in_use, segments_of

HOLD = "import mmap, sys\nfs = [open(p, 'r+b') for p in sys.argv[1:]]\nms = [mmap.mmap(f.fileno(), 4096) for f in fs]\n" \
       "[f.close() for f in fs]\nprint('ready', flush=True)\nsys.stdin.read()\n"  # fmt: skip


def _segment(path, size=4096) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def _holder(*paths: str) -> subprocess.Popen:
    """A process mapping ``paths`` (no fd left open: only its maps show them) until its stdin closes."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, *paths], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"ready"
    return p


def test_only_the_engines_own_unused_segments_are_removed(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    mine = [_segment(shm / n) for n in ("psm_a", "psm_shared", "vllm_dist_x-cpushm_0", "other_name")]
    elsewhere = _segment(shm / "psm_elsewhere")  # another engine's: never the killed one's
    engine = _holder(*mine)
    sibling = _holder(str(shm / "psm_shared"), elsewhere)  # e.g. a TP worker still running
    try:
        held = segments_of([engine.pid], str(shm))
        assert held == set(mine)
        engine.kill()
        engine.wait(10)
        assert str(shm / "psm_shared") in segments_in_use(str(shm))
        assert remove_orphans(held, str(shm)) == [
            "psm_a",
            "vllm_dist_x-cpushm_0",
        ]  # not other_name: not vLLM's
        assert sorted(os.listdir(shm)) == ["other_name", "psm_elsewhere", "psm_shared"]
    finally:
        sibling.stdin.close()
        sibling.wait(10)
    assert remove_orphans(held, str(shm)) == ["psm_shared"]  # its last user gone
    assert os.path.exists(elsewhere)
    if (
        os.geteuid() == 0
    ):  # another user's segment is never unlinked (only root can make one here; CI is root)
        theirs = _segment(shm / "psm_theirs")
        os.chown(theirs, 12345, 12345)
        assert remove_orphans({theirs}, str(shm)) == [] and os.path.exists(theirs)


def test_stop_lets_the_group_finish_after_its_leader_and_returns_when_it_is_gone(tmp_path):
    flag, ready = tmp_path / "child-finished", tmp_path / "child-ready"
    # the leader exits at once on SIGTERM; its child needs 1 s to finish its shutdown (as a vLLM engine does)
    child = f"import signal, time\nsignal.signal(signal.SIGTERM, lambda *_: (time.sleep(1), open({str(flag)!r}, 'w'), exit(0)))\nopen({str(ready)!r}, 'w').close()\ntime.sleep(60)\n"  # fmt: skip
    leader = (
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(60)\n"
    )
    proc = ManagedProcess("group", [sys.executable, "-c", leader])
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    assert len(group_pids(proc.pid)) == 2
    t0 = time.monotonic()
    proc.stop(10)
    assert flag.exists()  # the child finished its own shutdown instead of being SIGKILLed in the middle
    assert group_pids(proc.pid) == [] and time.monotonic() - t0 < 5
