"""`pdmesh up` as a user runs it: starts, answers, restarts a child that dies, and leaves no process behind on
SIGTERM or SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from pdmesh.procs import free_port

pytestmark = pytest.mark.e2e


def _wait_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """Read the process's stdout until a line containing ``needle`` (bounded by ``timeout``)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if sel.select(timeout=1.0):
            line = proc.stdout.readline()
            seen.append(line)
            if needle in line:
                return line
    raise AssertionError(f"no {needle!r} within {timeout}s; output:\n{''.join(seen)}")


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_up_serves_and_stops_without_orphans(tiny_model, tmp_path, sig):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdmesh.cli",
            "up",
            "--port",
            str(port),
            "--log-dir",
            str(tmp_path),
            "--",
            "--max-model-len",
            "1024",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ},
    )
    tree: list[psutil.Process] = []
    try:
        line = _wait_line(proc, "pdmesh ready", 300)
        assert f"127.0.0.1:{port}/v1" in line
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "pdmesh-tiny-llama", "prompt": "hello", "max_tokens": 3},
            timeout=120,
            trust_env=False,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        # a child that dies is restarted, not the end of the cluster
        decoder = next(p for p in psutil.Process(proc.pid).children() if "decoder" in " ".join(p.cmdline()))
        decoder.kill()
        assert "decode-0 exited; restarted" in _wait_line(proc, "restarted", 60)
        deadline = time.monotonic() + 180
        while True:
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    json={"model": "pdmesh-tiny-llama", "prompt": "hello again", "max_tokens": 3},
                    timeout=60,
                    trust_env=False,
                )
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the restarted decoder never served"
            time.sleep(2)
        assert proc.poll() is None
        tree = psutil.Process(proc.pid).children(recursive=True)
        # router + 2 worker agents + 2 vLLM servers (+ their engine processes)
        assert len(tree) >= 5, [p.cmdline()[:4] for p in tree]
        proc.send_signal(sig)
        proc.wait(90)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
    _gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"orphans left behind: {[(p.pid, p.cmdline()[:4]) for p in alive]}"
