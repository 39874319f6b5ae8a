"""Failpoints (:mod:`pdmesh.failpoints`) arm only from a directory, and fire only files, that no other user can
write; arming them is logged loudly (WARNING, once per process start). Actions used here are ``sleep 0``: a check
that failed open would not kill the test process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pdmesh.failpoints as failpoints

REPO = Path(__file__).resolve().parents[2]
NAME = "test.point"


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    monkeypatch.setattr(failpoints, "_DIR", failpoints._DIR)  # whatever a test configures is undone


def _dir(tmp_path: Path, mode: int) -> str:
    d = tmp_path / f"fp-{mode:o}"
    d.mkdir()
    os.chmod(d, mode)
    return str(d)


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "pdmesh.failpoints"
    ]


def test_a_world_writable_directory_is_refused_and_nothing_fires(tmp_path, caplog):
    d = _dir(tmp_path, 0o777)
    with caplog.at_level(logging.WARNING, "pdmesh.failpoints"):
        assert failpoints.configure(d) is None
    [msg] = _warnings(caplog)
    assert "NOT armed" in msg and "world-writable" in msg
    armed = failpoints.arm(d, NAME, "sleep 0")
    assert failpoints.hit(NAME) is False and os.path.exists(armed)  # not even claimed


def test_a_directory_of_another_user_or_not_a_directory_is_refused(tmp_path, caplog):
    plain = tmp_path / "file"
    plain.write_text("")
    with caplog.at_level(logging.WARNING, "pdmesh.failpoints"):
        assert failpoints.configure(str(plain)) is None
        assert failpoints.configure(str(tmp_path / "missing")) is None
    assert len(_warnings(caplog)) == 2 and all("NOT armed" in m for m in _warnings(caplog))
    if os.geteuid() != 0:
        pytest.skip("only root can give a directory to another user")
    d = _dir(tmp_path, 0o700)
    os.chown(d, 12345, 12345)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "pdmesh.failpoints"):
        assert failpoints.configure(d) is None
    [msg] = _warnings(caplog)
    assert "owned by uid 12345" in msg


def test_arming_warns_once_and_every_fire_warns(tmp_path, caplog):
    d = _dir(tmp_path, 0o700)
    with caplog.at_level(logging.WARNING, "pdmesh.failpoints"):
        assert failpoints.configure(d) == d
        assert [m for m in _warnings(caplog) if "ARMED" in m] == [_warnings(caplog)[0]]
        assert failpoints.hit(NAME) is False  # not armed: silent
        assert len(_warnings(caplog)) == 1
        failpoints.arm(d, NAME, "sleep 0")
        assert failpoints.hit(NAME) is True
        assert failpoints.fired_by(d, NAME) == [os.getpid()]
    msgs = _warnings(caplog)
    assert len(msgs) == 2 and f"failpoint {NAME} fired" in msgs[1]


def test_files_that_another_user_could_have_written_are_not_acted_on(tmp_path, caplog):
    d = _dir(tmp_path, 0o700)
    failpoints.configure(d)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "pdmesh.failpoints"):
        os.chmod(failpoints.arm(d, NAME, "sleep 0"), 0o666)
        assert failpoints.hit(NAME) is False
        target = tmp_path / "elsewhere"
        target.write_text("sleep 0")
        os.symlink(target, os.path.join(d, NAME))
        assert failpoints.hit(NAME) is False
        if os.geteuid() == 0:
            os.chown(failpoints.arm(d, NAME, "sleep 0"), 12345, 12345)
            assert failpoints.hit(NAME) is False
    msgs = _warnings(caplog)
    assert len(msgs) == (3 if os.geteuid() == 0 else 2) and all("refused" in m for m in msgs)
    assert "world-writable" in msgs[0]


@pytest.mark.parametrize("mode", [0o700, 0o777])
def test_a_process_started_with_the_variable_says_so_on_stderr(tmp_path, mode):
    """What an operator sees: the import-time check of ``PDMESH_FAILPOINTS_DIR`` (logging not configured yet, so
    the WARNING goes to stderr)."""
    d = _dir(tmp_path, mode)
    env = {**os.environ, failpoints.ENV: d}
    r = subprocess.run(
        [sys.executable, "-c", "import pdmesh.failpoints as f; print(f._DIR)"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    if mode == 0o700:
        assert r.stdout.strip() == d and r.stderr.count("failpoints ARMED") == 1
    else:
        assert r.stdout.strip() == "None" and "failpoints NOT armed" in r.stderr
