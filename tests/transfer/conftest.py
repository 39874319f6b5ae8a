from __future__ import annotations

import multiprocessing as mp
import os

import pytest

os.environ.setdefault("UCX_NET_DEVICES", "lo")

from pdmesh.transfer.nixl_backend import nixl_available

BACKENDS = [
    "tcp",
    "shm",
    pytest.param(
        "nixl", marks=pytest.mark.skipif(not nixl_available(), reason="nixl (nixl-cu12) not installed")
    ),
]


@pytest.fixture
def spawn():
    """Start child processes (spawn context); every one is SIGKILLed and joined at teardown, also on failure."""
    ctx = mp.get_context("spawn")
    procs = []

    def start(target, *args):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=target, args=(child, *args), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        return p, parent

    yield start
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(10)
