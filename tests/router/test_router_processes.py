"""Several router processes on one port: shared registrations, merged metrics, restart, clean stop.

Real processes (``pdmesh router --processes 2``) on 127.0.0.1 with fake workers. Each check uses fresh
connections, which the kernel spreads over the processes (SO_REUSEPORT), so a process that did not see a
registration, or metrics that were not merged, would show within a few connections.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from pdmesh.procs import ManagedProcess, free_port, wait_until
from pdmesh.router import processes
from pdmesh.router.config import LimitsConfig, RouterConfig
from pdmesh.router.peers import merge_metrics
from pdmesh.router.processes import share_of
from tests.e2e.oracle import scrape
from tests.router.fake_worker import FakeWorker
from tests.servers import ThreadServer

TOKEN = "procs-token"
COMPLETION = {"model": "m", "prompt": "hello there", "max_tokens": 3}


def _fresh(url: str, method: str, path: str, **kw) -> httpx.Response:
    """One request on a new connection (so it may land on any router process)."""
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as c:
        return c.request(method, path, **kw)


def _children(sup: ManagedProcess) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(sup.pid).children():
        try:  # a killed child is a zombie until the supervisor reaps it: not a router process any more
            if p.status() != psutil.STATUS_ZOMBIE and "pdmesh.router.processes" in " ".join(p.cmdline()):
                out.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return out


@pytest.fixture
def cluster(tmp_path: Path):
    workers = []
    for name in ("p0", "d0"):
        fw = FakeWorker(name)
        srv = ThreadServer(fw.app).start()
        workers.append((fw, srv))
    port = free_port()
    cfg = tmp_path / "router.yaml"
    cfg.write_text(
        f"router:\n  port: {port}\n  pd_mode: nixl\n  heartbeat_ttl_s: 120\n  log_level: warning\n"
        "  conditional_pd: {min_uncached_tokens: 0, max_prefill_queue_tokens: 0,"
        " idle_decoder_max_uncached_tokens: 0}\n"  # every request takes both legs (counted below)
    )
    env = {**os.environ, "PDMESH_CLUSTER_TOKEN": TOKEN}
    sup = ManagedProcess(
        "router",
        [sys.executable, "-m", "pdmesh.cli", "router", "--config", str(cfg), "--processes", "2"],
        env=env,
        log_path=str(tmp_path / "router.log"),
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return len(_children(sup)) == 2 and all(
                    _fresh(url, "GET", "/v1/models").status_code == 200 for _ in range(6)
                )
            except httpx.HTTPError:
                return False

        wait_until(up, 60, what="router processes")
        for (fw, srv), role in zip(workers, ("prefill", "decode"), strict=True):
            r = _fresh(
                url,
                "POST",
                "/internal/workers",
                json={"worker_id": fw.name, "role": role, "url": srv.url, "models": ["m"]},
                headers={"X-PDMesh-Token": TOKEN},
            )
            assert r.status_code == 200, r.text
        yield url, sup, workers
    finally:
        sup.stop(timeout=15)
        for _, srv in workers:
            srv.stop()


def _all_processes_know_both(url: str, tries: int = 16) -> None:
    for _ in range(tries):
        r = _fresh(url, "GET", "/internal/workers", headers={"X-PDMesh-Token": TOKEN})
        assert sorted(w["worker_id"] for w in r.json()) == ["d0", "p0"]


def test_processes_share_registrations_and_metrics_and_survive_a_child_crash(cluster) -> None:
    url, sup, workers = cluster
    _all_processes_know_both(url)
    n = 24
    for _ in range(n):
        r = _fresh(url, "POST", "/v1/completions", json=COMPLETION)
        assert r.status_code == 200, r.text
    assert len(workers[1][0].requests) == n  # every request reached the decode worker once
    for _ in range(6):  # whichever process answers, the metrics are the sum of both
        text = _fresh(url, "GET", "/metrics").text
        assert scrape(text, "pdmesh_router_requests_total", endpoint="/v1/completions", status="200") == n
        assert scrape(text, "pdmesh_router_pd_requests_total", mode="nixl") == n
        assert scrape(text, "pdmesh_router_worker_healthy", worker="d0") == 2  # one series per process
        assert scrape(text, "pdmesh_router_process_up") == 2
        assert scrape(text, "pdmesh_router_e2e_seconds_count", endpoint="/v1/completions") == n

    victim = _children(sup)[0]
    victim.kill()
    wait_until(
        lambda: len(_children(sup)) == 2 and victim.pid not in [c.pid for c in _children(sup)],
        30,
        what="crashed router process restarted",
    )
    # The new process copied the registrations from its sibling (no heartbeat was sent meanwhile).
    wait_until(lambda: _fresh(url, "GET", "/v1/models").status_code == 200, 30, what="restarted process up")
    _all_processes_know_both(url)
    for _ in range(8):
        assert _fresh(url, "POST", "/v1/completions", json=COMPLETION).status_code == 200

    r = _fresh(url, "DELETE", "/internal/workers/d0", headers={"X-PDMesh-Token": TOKEN})
    assert r.json() == {"removed": True}
    for _ in range(8):  # the deregistration reached every process
        assert _fresh(url, "GET", "/health").status_code == 503


def test_supervisor_stops_every_process_and_removes_its_directory(cluster) -> None:
    url, sup, _ = cluster
    kids = _children(sup)
    workdirs = {c.cmdline()[c.cmdline().index("--dir") + 1] for c in kids}
    assert len(workdirs) == 1 and Path(next(iter(workdirs))).is_dir()
    assert oct(Path(next(iter(workdirs))).stat().st_mode & 0o777) == "0o700"
    os.kill(sup.pid, signal.SIGTERM)
    sup.proc.wait(20)
    assert sup.proc.returncode == 0
    time.sleep(0.2)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in kids)
    assert not Path(next(iter(workdirs))).exists()
    with pytest.raises(httpx.ConnectError):
        _fresh(url, "GET", "/health")


def test_relay_header_grants_nothing(cluster) -> None:
    url, _, _ = cluster
    r = _fresh(
        url,
        "POST",
        "/internal/workers",
        json={"worker_id": "x", "role": "decode", "url": "http://127.0.0.1:9", "models": ["m"]},
        headers={"X-PDMesh-Relayed": "1"},
    )
    assert r.status_code == 403


def test_processes_zero_means_one_per_core() -> None:
    assert RouterConfig(processes=0).processes == len(os.sched_getaffinity(0))
    assert RouterConfig().processes == 1


def test_limits_are_split_evenly_between_processes() -> None:
    cfg = RouterConfig(
        limits=LimitsConfig(max_concurrency=5, rate_per_s=10, burst=3, per_key_max_concurrency=1)
    )
    part = share_of(cfg, 2).limits
    # Rounded down (the processes together stay within the limit), but a set limit never becomes 0 (= off).
    assert (part.max_concurrency, part.rate_per_s, part.burst, part.per_key_max_concurrency) == (2, 5.0, 1, 1)
    assert share_of(cfg, 2).limits.per_key_rate_per_s == 0  # disabled stays disabled


def test_merge_metrics_labels_each_process_and_marks_silent_ones() -> None:
    a = (
        "# HELP pdmesh_router_requests_total Client requests\n# TYPE pdmesh_router_requests_total counter\n"
        'pdmesh_router_requests_total{endpoint="/v1/completions",status="200"} 3.0\n'
        'pdmesh_router_requests_created{endpoint="/v1/completions",status="200"} 1.7e9\n'
        "# HELP pdmesh_router_e2e_seconds latency\n# TYPE pdmesh_router_e2e_seconds histogram\n"
        'pdmesh_router_e2e_seconds_bucket{endpoint="/v1/completions",le="0.1"} 2.0\n'
        'pdmesh_router_e2e_seconds_bucket{endpoint="/v1/completions",le="+Inf"} 3.0\n'
        'pdmesh_router_e2e_seconds_count{endpoint="/v1/completions"} 3.0\n'
        'pdmesh_router_e2e_seconds_sum{endpoint="/v1/completions"} 0.25\n'
    )
    b = a.replace("} 3.0", "} 4.0").replace("} 2.0", "} 1.0").replace("} 0.25", "} 0.5")
    merged = merge_metrics({0: a, 1: b, 2: None}).decode()
    # every series once per process, so a restarted process resets only its own series
    assert scrape(merged, "pdmesh_router_requests_total", router_process="0") == 3
    assert scrape(merged, "pdmesh_router_requests_total", router_process="1") == 4
    assert scrape(merged, "pdmesh_router_e2e_seconds_bucket", le="0.1") == 3
    assert scrape(merged, "pdmesh_router_e2e_seconds_count") == 7
    assert scrape(merged, "pdmesh_router_e2e_seconds_sum") == 0.75
    assert scrape(merged, "pdmesh_router_process_up", router_process="1") == 1
    assert scrape(merged, "pdmesh_router_process_up", router_process="2") == 0
    assert "_created" not in merged
    assert merged.count("# TYPE pdmesh_router_requests_total counter") == 1


def test_supervisor_gives_up_after_failures_right_after_starting(monkeypatch, caplog) -> None:
    """Children that die at once are restarted with backoff (ROUTER_RESTART_POLICY, delays shortened here); the
    5th failure in a row stops the supervisor with status 1, and each death is logged."""
    false = shutil.which("false")
    assert false
    fast = dataclasses.replace(processes.ROUTER_RESTART_POLICY, first_delay_s=0.01)
    monkeypatch.setattr(processes, "ROUTER_RESTART_POLICY", fast)
    monkeypatch.setattr(sys, "executable", false)  # every child exits 1 at once
    caplog.set_level(logging.INFO, logger="pdmesh.router")
    t0 = time.monotonic()
    assert processes.run_supervisor(RouterConfig(port=free_port(), processes=1)) == 1
    assert time.monotonic() - t0 < 30
    deaths = [r.getMessage() for r in caplog.records if "router process 0" in r.getMessage()]
    assert len(deaths) == 5 and "failed 5 times in a row right after starting" in deaths[-1]
    assert all("no log file of its own" in m for m in deaths)
