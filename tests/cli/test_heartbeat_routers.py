"""A worker registers with every router: a comma-separated list, and a name resolving to several router pods
(a Kubernetes headless Service), each holding the whole registry; routers that leave the name stop being told."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pdmesh.procs import free_port
from pdmesh.router.app import create_app
from pdmesh.router.config import RouterConfig
from pdmesh.router.registration import WorkerRegistration
from pdmesh.worker.heartbeat import RouterTargets, heartbeat_until_stopped
from pdmesh.worker.supervision import EngineWatch
from tests.cli.test_worker_agent import _FakeServer
from tests.servers import ThreadServer

REG = WorkerRegistration(worker_id="prefill-x", role="prefill", url="http://127.0.0.1:9", models=["m"])


def _ids(url: str) -> list[str]:
    r = httpx.get(url + "/internal/workers", headers={"X-PDMesh-Token": "tok"}, timeout=5)
    return [w["worker_id"] for w in r.json()]


def _router(host: str = "127.0.0.1", port: int | None = None) -> ThreadServer:
    return ThreadServer(create_app(RouterConfig(cluster_token="tok", heartbeat_ttl_s=30)), port, host).start()


async def _until(pred, timeout: float = 15.0) -> bool:
    for _ in range(int(timeout / 0.1)):
        if await asyncio.to_thread(pred):
            return True
        await asyncio.sleep(0.1)
    return False


def _run(routers, check) -> None:
    """Run the heartbeat loop against ``routers`` while ``check(stop)`` runs; then stop it (it must return 0)."""

    async def main() -> None:
        stop = asyncio.Event()
        watch = EngineWatch(_FakeServer(), _FakeServer, startup_timeout=5)
        task = asyncio.create_task(heartbeat_until_stopped(watch, REG, routers, stop))
        try:
            await check()
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 15) == 0

    asyncio.run(main())


def test_a_comma_separated_list_registers_with_each_router_and_leaves_each(monkeypatch):
    monkeypatch.setenv("PDMESH_CLUSTER_TOKEN", "tok")
    a, b = _router(), _router()
    try:

        async def check() -> None:
            assert await _until(lambda: _ids(a.url) == ["prefill-x"] and _ids(b.url) == ["prefill-x"])

        _run(f"{a.url}, {b.url}/", check)
        assert _ids(a.url) == [] and _ids(b.url) == []  # deregistered from both on stop
    finally:
        a.stop()
        b.stop()


def test_a_name_with_several_addresses_is_one_router_per_address(monkeypatch):
    """Two router "pods" on 127.0.0.1 and 127.0.0.2 (same port) behind one name: both get the registration; one
    down does not hold the other back; once the name stops listing one, only the other is heartbeaten."""
    monkeypatch.setenv("PDMESH_CLUSTER_TOKEN", "tok")
    port = free_port("127.0.0.2")
    a, b = _router("127.0.0.1", port), _router("127.0.0.2", port)
    answer = [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
    ]  # the third "pod" is not up: it must not delay the others
    asked: list[str] = []

    async def resolve(host: str, p: int) -> list[str]:
        asked.append(host)
        assert p == port
        return list(answer)

    targets = RouterTargets(f"http://routers.pdmesh.test:{port}", resolve=resolve, resolve_interval_s=0.2)
    try:

        async def check() -> None:
            assert await _until(lambda: _ids(a.url) == ["prefill-x"] and _ids(b.url) == ["prefill-x"])
            answer.remove("127.0.0.2")  # pod b leaves the Service: deregistered by nobody, told nothing more
            await asyncio.sleep(0.5)
            assert await targets.current() == [f"http://127.0.0.1:{port}", f"http://127.0.0.3:{port}"]

        _run(targets, check)
        assert asked and set(asked) == {"routers.pdmesh.test"}
        assert _ids(a.url) == []  # told on stop
        assert _ids(b.url) == ["prefill-x"]  # left to its TTL: it was no longer a target
    finally:
        a.stop()
        b.stop()


def test_names_resolving_to_one_address_and_failed_resolutions_keep_the_url():
    async def main() -> None:
        calls = 0

        async def flaky(host: str, port: int) -> list[str]:
            nonlocal calls
            calls += 1
            if calls == 1:
                return ["10.0.0.1", "10.0.0.2"]
            raise OSError("temporary failure in name resolution")

        t = RouterTargets("http://router:8000", resolve=flaky, resolve_interval_s=0)
        assert await t.current() == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
        assert await t.current() == [
            "http://10.0.0.1:8000",
            "http://10.0.0.2:8000",
        ]  # a DNS blip drops nothing

        async def one(host: str, port: int) -> list[str]:
            return ["fd00::7"] if host == "v6" else ["10.0.0.9"]

        t = RouterTargets("http://router:8000,http://127.0.0.1:9000,http://v6:80/", resolve=one)
        assert await t.current() == ["http://router:8000", "http://127.0.0.1:9000", "http://v6:80"]

        async def two_v6(host: str, port: int) -> list[str]:
            return ["fd00::1", "fd00::2"]

        t = RouterTargets("http://routers", resolve=two_v6)
        assert await t.current() == ["http://[fd00::1]", "http://[fd00::2]"]

        async def dual_stack(host: str, port: int) -> list[str]:
            return ["::1", "127.0.0.1"]

        t = RouterTargets("http://localhost:8000", resolve=dual_stack)
        assert await t.current() == [
            "http://localhost:8000"
        ]  # one router reachable two ways, not two routers
        t = RouterTargets("https://routers:8443", resolve=flaky)
        assert await t.current() == ["https://routers:8443"]  # the certificate names the host: never expanded

    asyncio.run(main())


def test_a_router_that_hangs_delays_neither_the_others_nor_the_stop(monkeypatch):
    """A router that accepts connections and never answers (a frozen pod): the other router registers the worker
    at once, and stopping does not wait for the hung call beyond the deregistration bound."""
    import socket
    import time

    monkeypatch.setenv("PDMESH_CLUSTER_TOKEN", "tok")
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # connections complete in the backlog; nothing is ever read or answered
    a = _router()
    try:

        async def check() -> None:
            t0 = time.monotonic()
            assert await _until(lambda: _ids(a.url) == ["prefill-x"], timeout=4)
            assert time.monotonic() - t0 < 3  # not behind the hung router's 5 s read timeout

        t0 = time.monotonic()
        _run(f"http://127.0.0.1:{hung.getsockname()[1]},{a.url}", check)
        assert time.monotonic() - t0 < 8
        assert _ids(a.url) == []
    finally:
        hung.close()
        a.stop()


@pytest.mark.parametrize("spec", ["", " , ", "router:8000", "ftp://router", "http://"])
def test_bad_router_specs_are_refused(spec):
    with pytest.raises(ValueError):
        RouterTargets(spec)
