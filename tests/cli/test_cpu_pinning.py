"""A CPU worker confines itself, and every process it starts, to its engine's bound cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pdmesh.worker.cpu_pinning import engine_cores


@pytest.mark.parametrize(
    "bind, cores",
    [
        ("0", {0}),
        ("1", {1}),
        ("0-3", {0, 1, 2, 3}),
        ("0,2", {0, 2}),
        ("0-1|4-5", {0, 1, 4, 5}),
        ("auto", None),
        ("all", None),
        ("nobind", None),
        ("", None),
        (None, None),
        ("3-1", None),
        ("0;1", None),
    ],
)
def test_engine_cores_reads_only_explicit_lists(bind, cores):
    assert engine_cores(bind) == cores


CHILD = """
import os, subprocess, sys
from pdmesh.worker.cpu_pinning import pin_worker_to_engine_cores
got = pin_worker_to_engine_cores(sys.argv[1])
grandchild = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                            capture_output=True, text=True, check=True).stdout.strip()
print(sorted(got) if got else None, sorted(os.sched_getaffinity(0)), grandchild)
"""


def _run(device: str, bind: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    if bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    out = subprocess.run(
        [sys.executable, "-c", CHILD, device], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_worker_and_what_it_starts_run_on_the_engine_core():
    core = max(os.sched_getaffinity(0))
    everything = sorted(os.sched_getaffinity(0))
    assert _run("cpu", str(core)) == f"[{core}] [{core}] [{core}]"
    assert _run("cuda", str(core)) == f"None {everything} {everything}"  # GPU workers are never pinned
    assert _run("cpu", "auto") == f"None {everything} {everything}"
    assert _run("cpu", "4096") == f"None {everything} {everything}"  # a core this process may not use
