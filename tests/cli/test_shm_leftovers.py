"""What a killed vLLM leaves in /dev/shm is removed by its owner, and nothing a live process uses
(:mod:`pdmesh.worker.shm_leftovers`). Run against a directory of its own, with real processes holding segments."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

from pdmesh.worker.shm_leftovers import remove_orphans, segments_in_use


def _segment(path, size=4096) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def test_only_unused_new_segments_of_this_user_are_removed(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    _segment(shm / "psm_old")  # older than the engine: someone else's lifetime
    time.sleep(0.05)
    since = time.time()
    time.sleep(0.05)
    for name in ("psm_orphan", "psm_mapped", "psm_open_elsewhere", "vllm_dist_x-cpushm_0", "other_name"):
        _segment(shm / name)
    others = []
    if os.geteuid() == 0:  # another user's segment (only root can make one here; CI runs as root)
        _segment(shm / "psm_someone_elses")
        os.chown(shm / "psm_someone_elses", 12345, 12345)
        others = ["psm_someone_elses"]
    held = open(shm / "psm_mapped", "r+b")  # noqa: SIM115 - closed below
    view = mmap.mmap(held.fileno(), 4096)
    held.close()  # mapped, no fd left: only /proc/<pid>/maps shows it
    holder = subprocess.Popen(
        [sys.executable, "-c", f"f = open({str(shm / 'psm_open_elsewhere')!r}, 'rb'); input()"],
        stdin=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while str(shm / "psm_open_elsewhere") not in segments_in_use(str(shm)):
            assert time.monotonic() < deadline, "the holder never opened its segment"
            time.sleep(0.05)
        assert str(shm / "psm_mapped") in segments_in_use(str(shm))
        assert sorted(remove_orphans(since, str(shm))) == ["psm_orphan", "vllm_dist_x-cpushm_0"]
        left = sorted(p.name for p in shm.iterdir())
        assert left == sorted(["other_name", "psm_mapped", "psm_old", "psm_open_elsewhere", *others])
    finally:
        holder.communicate(b"\n", timeout=10)
        view.close()
    # once nothing holds them, the segments of this user created since are orphans too
    assert sorted(remove_orphans(since, str(shm))) == ["psm_mapped", "psm_open_elsewhere"]
    assert remove_orphans(since, str(shm / "missing")) == []
