"""Fixtures for the kvcache tests: a real redis-server, a cache server, a tier server in a thread or a process.
Every spawned process is killed at teardown, also on failure; everything binds 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pdmesh.kvcache.cache_server import CacheServer
from pdmesh.kvcache.config import TierConfig
from pdmesh.kvcache.ready_line import parse_ready_line
from pdmesh.kvcache.server import TierServer
from tests.redis_server import RedisProcess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private redis-server on a free port (:class:`tests.redis_server.RedisProcess`)."""
    r = RedisProcess(str(tmp_path_factory.mktemp("redis"))).start()
    try:
        yield r.url
    finally:
        r.kill()


@pytest.fixture
def cache_server():
    server = CacheServer("127.0.0.1", 0, max_bytes=256 << 20, token="cs-token")
    server.start()
    try:
        yield server
    finally:
        server.close()


class ThreadedTier:
    """A TierServer running in its own event loop thread."""

    def __init__(self, config: TierConfig) -> None:
        self.config = config
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: TierServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main():
            try:
                self.server = TierServer(self.config)
                await self.server.start()
            except BaseException as e:
                self._error = e
                self._ready.set()
                return
            self.loop = asyncio.get_running_loop()
            self._ready.set()
            await self.server.wait_closed()

        asyncio.run(main())

    def start(self) -> ThreadedTier:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("tier server did not start within 15 s")
        if self._error is not None:
            raise self._error
        return self

    def run(self, coro_fn, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(timeout)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def stop(self) -> None:
        if self.server is not None and self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self._thread.join(10)


def tier_config(tmp_path: Path, **overrides) -> TierConfig:
    base = {
        "http_port": 0,
        "socket_path": str(tmp_path / "tier.sock"),
        "pool_bytes": 16 * 65536,
        "slot_bytes": 65536,
        "token": "tier-token",
        "reap_interval_s": 0.1,
        "lease_grace_s": 0.1,
    }
    base.update(overrides)
    return TierConfig.load(None, env={}, **base)


@pytest.fixture
def tier_factory():
    tiers: list[ThreadedTier] = []

    def make(config: TierConfig) -> ThreadedTier:
        t = ThreadedTier(config).start()
        tiers.append(t)
        return t

    yield make
    for t in tiers:
        t.stop()


class TierProcess:
    """``python -m pdmesh.kvcache.cli tier-server`` as a child process; waits for its READY line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdmesh.kvcache.cli", "tier-server", *args],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.info: dict = {}

    def wait_ready(self, timeout: float = 30) -> dict:
        result: dict = {}

        def read():
            for line in self.proc.stdout:  # type: ignore[union-attr]
                info = parse_ready_line(line)
                if info is not None:
                    result.update(info)
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            raise RuntimeError(f"tier server process not ready in {timeout} s (rc={self.proc.poll()})")
        self.info = result
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        seg = self.info.get("segment")
        if seg:  # a SIGKILLed server cannot unlink its segment
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{seg}")


@pytest.fixture
def tier_process():
    procs: list[TierProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> TierProcess:
        p = TierProcess(args, env or {})
        procs.append(p)
        p.wait_ready()
        return p

    yield start
    for p in procs:
        p.kill()
