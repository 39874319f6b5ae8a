"""The worker agent's registration loop against a real router: retries while the router is down, registers
when it comes up, deregisters on stop, and stops when its vLLM process dies."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

import httpx
import pytest

from pdmesh.procs import free_port
from pdmesh.router.app import create_app
from pdmesh.router.config import RouterConfig
from pdmesh.router.registration import WorkerRegistration
from pdmesh.worker.agent import heartbeat_until_stopped
from pdmesh.worker.supervision import ENGINE_RESTART_POLICY, CrashLoop, EngineWatch
from tests.servers import ThreadServer


class _FakeProcess:
    def __init__(self) -> None:
        self.exit_code: int | None = None

    def alive(self) -> bool:
        return self.exit_code is None

    def poll(self) -> int | None:
        return self.exit_code


class _FakeServer:
    """A vLLM server stand-in: ``healthy_after`` s to pass its health check, or ``fail`` to die while starting."""

    def __init__(self, healthy_after: float = 0.0, fail: bool = False) -> None:
        self.process = _FakeProcess()
        self.url = "http://127.0.0.1:9"
        self.healthy_after, self.fail = healthy_after, fail
        self.stopped = False

    def wait_healthy(self, timeout: float) -> dict:
        time.sleep(self.healthy_after)
        if self.fail:
            self.process.exit_code = 1
            raise RuntimeError("vLLM exited with code 1 before becoming healthy")
        return {}

    def stop(self, timeout: float = 20.0) -> None:
        self.stopped = True
        if self.process.exit_code is None:
            self.process.exit_code = -15


def _watch(server: _FakeServer, start=None, **kw) -> EngineWatch:
    return EngineWatch(server, start or (lambda: _FakeServer()), startup_timeout=5, **kw)


REG = WorkerRegistration(worker_id="decode-x", role="decode", url="http://127.0.0.1:9", models=["m"])


def _workers(url: str) -> list[dict]:
    return httpx.get(url + "/internal/workers", headers={"X-PDMesh-Token": "tok"}, timeout=5).json()


def test_retries_until_router_is_up_then_deregisters_on_stop(monkeypatch, caplog):
    monkeypatch.setenv("PDMESH_CLUSTER_TOKEN", "tok")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    result: dict = {}
    ready = threading.Event()

    async def agent_main() -> int:
        result["loop"], result["stop"] = asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        return await heartbeat_until_stopped(_watch(_FakeServer()), REG, url, result["stop"])

    def agent() -> None:
        result["code"] = asyncio.run(agent_main())

    caplog.set_level(logging.INFO, logger="pdmesh.worker")
    t = threading.Thread(target=agent, daemon=True)
    t.start()
    time.sleep(1.5)  # router not there yet: the agent must keep trying and say so
    assert any("unreachable" in r.getMessage() for r in caplog.records)
    router = ThreadServer(create_app(RouterConfig(cluster_token="tok", heartbeat_ttl_s=4)), port=port).start()
    try:
        deadline = time.monotonic() + 20
        while not _workers(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [w["worker_id"] for w in _workers(url)] == ["decode-x"]
        assert ready.wait(5)
        result["loop"].call_soon_threadsafe(result["stop"].set)  # what the SIGTERM handler does
        t.join(15)
        assert result.get("code") == 0
        assert _workers(url) == []
    finally:
        router.stop()


def test_agent_restarts_a_dead_vllm_and_registers_again(monkeypatch):
    """vLLM exits: the worker leaves the router at once, starts a new engine, and is back once it is healthy."""
    monkeypatch.setenv("PDMESH_CLUSTER_TOKEN", "tok")
    router = ThreadServer(create_app(RouterConfig(cluster_token="tok"))).start()
    first = _FakeServer()
    started: list[_FakeServer] = []

    def start() -> _FakeServer:
        started.append(_FakeServer(healthy_after=1.5))
        return started[-1]

    watch = _watch(first, start)
    try:

        async def run() -> tuple[list, list, int]:
            stop = asyncio.Event()
            task = asyncio.create_task(heartbeat_until_stopped(watch, REG, router.url, stop))
            for _ in range(100):
                await asyncio.sleep(0.1)
                if await asyncio.to_thread(_workers, router.url):
                    break
            first.process.exit_code = 137  # SIGKILLed engine
            await asyncio.sleep(0.8)
            during = await asyncio.to_thread(_workers, router.url)  # restarting: not registered
            for _ in range(100):
                await asyncio.sleep(0.1)
                if await asyncio.to_thread(_workers, router.url):
                    break
            after = await asyncio.to_thread(_workers, router.url)
            stop.set()
            return during, after, await asyncio.wait_for(task, 15)

        during, after, code = asyncio.run(run())
        assert during == [] and [w["worker_id"] for w in after] == ["decode-x"] and code == 0
        assert len(started) == 1 and watch.server is started[0] and watch.restarts == 1 and first.stopped
    finally:
        router.stop()


def test_an_engine_that_keeps_dying_is_a_crash_loop(monkeypatch, caplog):
    """Failed restarts back off (1 s, 2 s, ...) and count; past max_exits the worker deregisters and gives up."""
    monkeypatch.setenv("PDMESH_CLUSTER_TOKEN", "tok")
    router = ThreadServer(create_app(RouterConfig(cluster_token="tok"))).start()
    now = [0.0]
    first = _FakeServer()
    starts: list[float] = []

    def start() -> _FakeServer:
        starts.append(now[0])
        return _FakeServer(fail=True)

    policy = dataclasses.replace(ENGINE_RESTART_POLICY, max_exits=3, window_s=60)
    watch = _watch(first, start, clock=lambda: now[0], policy=policy)
    try:

        async def run() -> BaseException | None:
            task = asyncio.create_task(heartbeat_until_stopped(watch, REG, router.url, asyncio.Event()))
            for _ in range(100):
                await asyncio.sleep(0.1)
                if await asyncio.to_thread(_workers, router.url):
                    break
            first.process.exit_code = 139
            for _ in range(150):
                await asyncio.sleep(0.1)
                now[0] += 0.5
                if task.done():
                    break
            return task.exception() if task.done() else None

        error = asyncio.run(run())
        assert isinstance(error, CrashLoop), error
        assert "4 times" in str(error)
        assert len(starts) == 3  # the exit, then two failed starts with growing gaps between them
        delays = [
            r.getMessage().rsplit("next try in ", 1)[1]
            for r in caplog.records
            if "next try in" in r.getMessage()
        ]
        assert delays == ["1s", "2s", "4s"]
        assert starts[2] - starts[1] >= 2.0 and starts[1] - starts[0] >= 1.0
        assert _workers(router.url) == []
    finally:
        router.stop()


def test_tier_http_port_defaults_to_the_vllm_port_plus_1000():
    from pdmesh.worker.tier_process import tier_http_port

    assert tier_http_port(-1, 8100) == 9100  # prefiller default
    assert tier_http_port(-1, 8200) == 9200  # decoder default
    assert tier_http_port(0, 8100) == 0  # any free port
    assert tier_http_port(7000, 8100) == 7000
    assert tier_http_port(-1, 65000) == 0  # no valid port above: any free port


class _FakeTier:
    def __init__(self, transfer: str) -> None:
        self.process = _FakeProcess()
        self.info = {"http": "http://127.0.0.1:9100", "transfer": transfer}
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def wait_ready(self, timeout: float) -> dict:
        return self.info


def test_a_dead_tier_is_advertised_away_then_restarted_with_backoff():
    """While the node's tier is down the worker advertises no transfer address; restarts run in the background
    (a heartbeat never waits for one) and back off on failure."""
    from pdmesh.worker.supervision import TierWatch

    now = [0.0]
    first = _FakeTier("127.0.0.1:7001")
    starts: list[int] = []
    release = threading.Event()

    class _SlowTier(_FakeTier):
        def wait_ready(self, timeout: float) -> dict:
            assert release.wait(10)
            return self.info

    def start() -> _FakeTier:
        starts.append(1)
        if len(starts) == 1:
            raise RuntimeError("tier server not ready")
        return _SlowTier("127.0.0.1:7002")

    async def settle() -> None:  # let a background restart run up to its wait
        for _ in range(50):
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        watch = TierWatch(first, start, clock=lambda: now[0])
        reg = await watch.advertised(REG)
        assert reg.transfer_address == "127.0.0.1:7001" and not starts
        first.process.exit_code = 137  # SIGKILLed
        reg = await watch.advertised(REG)  # at once: no tier while the restart runs
        assert reg.transfer_address is None and reg.tier_url is None
        await settle()
        assert len(starts) == 1 and first.stopped  # that restart failed
        now[0] = 0.5
        assert (await watch.advertised(REG)).transfer_address is None  # backing off
        await settle()
        assert len(starts) == 1
        now[0] = 1.0
        t0 = time.monotonic()
        assert (await watch.advertised(REG)).transfer_address is None  # restarting: not ready yet
        await settle()
        assert (await watch.advertised(REG)).transfer_address is None and len(starts) == 2
        assert time.monotonic() - t0 < 5  # heartbeats went on while the new tier was not ready
        release.set()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if (await watch.advertised(REG)).transfer_address == "127.0.0.1:7002":
                break
        assert watch.restarts == 1
        await watch.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["push", "nixl"])
def test_a_worker_never_listens_beyond_loopback_without_the_cluster_token(mode):
    """Both PD modes: the engine's API key comes from the token; nixl mode's side channel (unauthenticated in vLLM)
    on a non-loopback address needs the token too, and is logged as to be kept private."""
    from pdmesh.worker.agent import check_worker_binds

    with pytest.raises(SystemExit, match="without a cluster token"):
        check_worker_binds("0.0.0.0", "10.0.0.5", mode, "")
    check_worker_binds("127.0.0.1", "127.0.0.1", mode, "")  # a laptop: fine without a token
    check_worker_binds("0.0.0.0", "10.0.0.5", mode, "s3cret")
    if mode == "nixl":
        with pytest.raises(SystemExit, match="NIXL side channel"):
            check_worker_binds("127.0.0.1", "10.0.0.5", mode, "")
