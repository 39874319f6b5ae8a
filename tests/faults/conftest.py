"""Fixtures of the fault-injection suite: the e2e fixtures (real vLLM engines, the tiny model) and a private
redis-server that a test can kill and start again on the same port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from pdmesh.procs import free_port
from tests.e2e.conftest import _e2e_env, tiny_model  # noqa: F401 - fixtures re-exported for this folder


class RedisProcess:
    """A redis-server on a fixed port; :meth:`kill` (SIGKILL) and :meth:`start` again, same port, empty."""

    def __init__(self, binary: str, directory: str) -> None:
        self.binary, self.dir = binary, directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = subprocess.Popen(
            [*argv, "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start within 10 s")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_process(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("PDMESH_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server not installed and PDMESH_REQUIRE_REDIS=1")
        pytest.skip("redis-server binary not installed (apt-get install redis-server)")
    r = RedisProcess(binary, str(tmp_path_factory.mktemp("redis-faults")))
    r.start()
    try:
        yield r
    finally:
        r.kill()
