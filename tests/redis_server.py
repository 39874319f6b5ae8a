"""A private redis-server for tests: one free port on 127.0.0.1, no persistence; killed and started again on the
same port by the fault tests. Skips the test (or fails it under ``PDMESH_REQUIRE_REDIS=1``, as CI sets) when the
binary is missing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from pdmesh.procs import free_port


class RedisProcess:
    """A redis-server on a fixed port; :meth:`kill` (SIGKILL) and :meth:`start` again, same port, empty."""

    def __init__(self, directory: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("PDMESH_REQUIRE_REDIS") == "1":
                pytest.fail("redis-server not installed and PDMESH_REQUIRE_REDIS=1")
            pytest.skip("redis-server binary not installed (apt-get install redis-server)")
        self.binary, self.dir = binary, directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
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
                return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        pytest.fail("redis-server did not start within 10 s")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
