"""Sweeping stale shared-memory segments never removes one that a live process uses, even a process in another
PID namespace that shares ``/dev/shm`` (sibling containers, ``--ipc=host``), whose pid the sweeping process cannot
see: :func:`pdmesh.transfer.segment.sweep_stale_segments` (a tier server's start) and
:mod:`pdmesh.worker.shm_leftovers` (a stopped vLLM's leftovers).

The real-namespace tests run the sweeping side under ``unshare --pid --fork --mount-proc`` (root only; skipped
with the reason elsewhere): its ``/proc`` and ``kill(pid, 0)`` then see only its own namespace, as in a sibling
container. Segments live in a directory of the test's own, never in the host's ``/dev/shm``."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pdmesh.transfer import segment

REPO = Path(__file__).resolve().parents[2]

# The sweep as a tier server runs it, inside whatever namespace it is started in: argv = shm dir, owner pid.
SWEEP = textwrap.dedent(
    """
    import json, os, sys
    from pdmesh.transfer import segment
    segment.SHM_DIR = sys.argv[1]
    try:
        os.kill(int(sys.argv[2]), 0)
        visible = True
    except ProcessLookupError:
        visible = False
    print(json.dumps({"owner_visible": visible, "removed": segment.sweep_stale_segments()}))
    """
)

# Creates a segment (named with its own pid, as the tier's pool is, unless argv names one) and holds it until its
# stdin closes, or SIGKILLs itself at once when argv[2] == "die" (a SIGKILLed tier server).
OWNER = textwrap.dedent(
    """
    import os, secrets, signal, sys
    from pdmesh.transfer import segment
    segment.SHM_DIR = sys.argv[1]
    name = sys.argv[3] if len(sys.argv) > 3 else f"pdmesh-tier-{os.getpid()}-{secrets.token_hex(4)}"
    seg = segment.SharedSegment(name, 64 << 10)
    seg.buffer[:5] = b"alive"
    print(name, flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()
    """
)


def _unshare_works() -> str | None:
    """None when this process may run a command in a new PID namespace, else why not."""
    if os.geteuid() != 0:
        return "needs root for unshare --pid"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not installed"
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
    )
    if r.returncode:
        return f"unshare --pid not permitted here: {r.stderr.decode(errors='replace').strip()}"
    return None


def _in_new_pidns(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _owner(shm: Path, mode: str, name: str | None = None) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-c", OWNER, str(shm), mode] + ([name] if name else [])
    p = subprocess.Popen(args, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def shm(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "shm"
    d.mkdir()
    monkeypatch.setattr(segment, "SHM_DIR", str(d))
    return d


def test_a_sweep_in_another_pid_namespace_keeps_a_live_tiers_segment(shm):
    """A tier server starting in a sibling PID namespace sees no process with the live tier's pid (the old rule,
    pid gone = segment stale, unlinked the live pool here); it keeps the live segment, and still removes the
    segment of a SIGKILLed tier."""
    why = _unshare_works()
    if why:
        pytest.skip(why)
    live, live_name = _owner(shm, "hold")
    try:
        dead, dead_name = _owner(shm, "die")
        dead.wait(10)
        assert dead.returncode == -signal.SIGKILL and (shm / dead_name).exists()

        r = _in_new_pidns(sys.executable, "-c", SWEEP, str(shm), str(live.pid))
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["owner_visible"] is False  # the live tier's pid means nothing in there
        assert out["removed"] == [dead_name]
        assert (shm / live_name).exists() and not (shm / dead_name).exists()
        assert (shm / live_name).read_bytes()[:5] == b"alive"
    finally:
        live.stdin.close()
        live.wait(10)
    assert not (shm / live_name).exists()  # its owner unlinked it on the way out


def test_a_locked_segment_is_kept_whatever_pid_its_name_carries(shm):
    """Without namespaces: a segment named with a pid that does not exist here (what a tier of another PID
    namespace looks like) is kept while its creator lives, and removed once it is gone."""
    name = f"pdmesh-tier-{_dead_pid()}-{secrets.token_hex(4)}"
    owner, got = _owner(shm, "hold", name)
    assert got == name
    try:
        assert segment.sweep_stale_segments() == []
        assert (shm / name).exists()
    finally:
        owner.stdin.close()
        owner.wait(10)
    # its owner unlinked it; a SIGKILLed one leaves it, unlocked: removed
    killed, _ = _owner(shm, "die", name)
    killed.wait(10)
    assert (shm / name).exists()
    assert segment.sweep_stale_segments() == [name] and not (shm / name).exists()


def test_unlocked_segments_of_live_pids_and_segments_being_created_are_kept(shm):
    """A segment of a pid alive here is kept even without a lock (one made by an older pdmesh); an unlocked
    empty file is kept while it may still be being created (its creator locks it right after ``O_EXCL``), and
    removed once older than :data:`~pdmesh.transfer.segment.CREATING_S`; another user's file is never touched."""
    old_style = shm / f"pdmesh-tier-{os.getppid()}-0badcafe"
    old_style.write_bytes(b"x")
    fresh = shm / f"pdmesh-tier-{_dead_pid()}-00000001"
    fresh.touch()
    assert segment.sweep_stale_segments() == []
    past = time.time() - segment.CREATING_S - 1
    os.utime(fresh, (past, past))
    assert segment.sweep_stale_segments() == [fresh.name]
    assert old_style.exists()
    if os.geteuid() == 0:
        theirs = shm / f"pdmesh-tier-{_dead_pid()}-00000002"
        theirs.write_bytes(b"x")
        os.chown(theirs, 12345, 12345)
        assert segment.sweep_stale_segments() == [] and theirs.exists()


def test_a_segments_lock_is_held_until_close():
    """The proof of life is a lock on the file from creation to :meth:`SharedSegment.close` (real /dev/shm)."""
    import fcntl

    seg = segment.SharedSegment(f"pdmesh-test-{os.getpid()}-{secrets.token_hex(4)}", 4096)
    path = segment.segment_path(seg.name)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seg.close()
        seg.close()  # idempotent
        assert not os.path.exists(path)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds it any more
    finally:
        os.close(fd)


# shm_leftovers (vLLM's psm_/vllm_dist_ segments): refuted by design, checked across a real namespace boundary.
ENGINE_STOP = textwrap.dedent(
    """
    import json, subprocess, sys
    from pdmesh.worker.shm_leftovers import remove_orphans, segments_in_use, segments_of
    shm, mine, theirs = sys.argv[1:4]
    hold = "import mmap, sys\\nf = open(sys.argv[1], 'r+b')\\nm = mmap.mmap(f.fileno(), 4096)\\nf.close()\\n" \\
           "print('ready', flush=True)\\nsys.stdin.read()\\n"
    engine = subprocess.Popen([sys.executable, "-c", hold, mine], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert engine.stdout.readline().strip() == b"ready"
    held = segments_of([engine.pid], shm)
    engine.kill()
    engine.wait(10)
    print(json.dumps({
        "held": sorted(held),
        "theirs_visible": theirs in segments_in_use(shm),
        "removed": remove_orphans(held, shm),
    }))
    """
)


def test_vllm_leftovers_removal_only_touches_the_stopped_engines_own_segments(tmp_path):
    """:func:`~pdmesh.worker.shm_leftovers.remove_orphans` cannot see a process of another PID namespace in
    ``/proc`` (shown here), so it relies on its candidates instead: only segments the stopped engine itself had
    mapped (random names: ``psm_`` + 32 bits, ``vllm_dist_`` + a uuid4). Another engine's segment, mapped only by
    a process invisible to it, is never a candidate and stays."""
    why = _unshare_works()
    if why:
        pytest.skip(why)
    shm = tmp_path / "shm"
    shm.mkdir()
    mine, theirs = shm / "psm_mine0001", shm / "psm_theirs01"
    for p in (mine, theirs):
        with open(p, "wb") as f:
            f.truncate(4096)
    hold = "import mmap, sys\nf = open(sys.argv[1], 'r+b')\nm = mmap.mmap(f.fileno(), 4096)\nf.close()\n"
    hold += "print('ready', flush=True)\nsys.stdin.read()\n"
    other = subprocess.Popen(
        [sys.executable, "-c", hold, str(theirs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert other.stdout.readline().strip() == b"ready"
        r = _in_new_pidns(sys.executable, "-c", ENGINE_STOP, str(shm), str(mine), str(theirs))
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["held"] == [str(mine)]
        assert out["theirs_visible"] is False  # the other namespace's user of it is invisible in there
        assert out["removed"] == [mine.name]
        assert theirs.exists() and not mine.exists()
    finally:
        other.stdin.close()
        other.wait(10)
