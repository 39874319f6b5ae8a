"""What the router tells its operator and how fast it leaves a dead worker (issue: compose/operator friction)."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pdmesh.breaker import CircuitBreaker
from pdmesh.cli import main
from pdmesh.procs import free_port
from pdmesh.router.config import RouterConfig
from pdmesh.router.registration import WorkerRegistration
from pdmesh.router.registry import Registry
from tests.router.conftest import TOKEN
from tests.servers import ThreadServer


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _reg(wid: str) -> WorkerRegistration:
    return WorkerRegistration(worker_id=wid, role="decode", url=f"http://127.0.0.1:1/{wid}", models=["m"])


def test_per_worker_leg_counts_and_prompt_tokens_are_on_metrics(harness):
    harness.add("prefill", "p0")
    harness.add("decode", "d0")
    harness.add("decode", "d1")
    prompt = "one two three four"
    for _ in range(4):
        r = harness.client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200
    assert harness.metric("pdmesh_router_worker_legs_total", worker="p0", leg="prefill") == 4
    d0 = harness.metric("pdmesh_router_worker_legs_total", worker="d0", leg="decode")
    d1 = harness.metric("pdmesh_router_worker_legs_total", worker="d1", leg="decode")
    assert d0 + d1 == 4 and d0 > 0 and d1 > 0  # round robin spreads the decode legs
    fw = harness.workers[0][0]
    per_request = fw._prompt_len({"model": "m", "prompt": prompt})
    assert per_request > 0
    # counted from the prefill leg's usage, without any policy analysing the prompt
    assert harness.metric("pdmesh_router_prompt_tokens_total") == 4 * per_request


def test_failed_legs_are_counted_per_worker(harness):
    harness.add("prefill", "p0")
    bad = harness.add("decode", "d-bad")
    harness.add("decode", "d-ok")
    bad.fail_status = 500
    for _ in range(3):
        r = harness.client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200
    assert harness.metric("pdmesh_router_worker_leg_failures_total", worker="d-bad", leg="decode") >= 1
    assert harness.metric("pdmesh_router_worker_leg_failures_total", worker="d-ok", leg="decode") == 0


def test_panic_mode_skips_workers_that_fail_and_stopped_heartbeating():
    clock = Clock()
    reg = Registry(ttl_s=10.0, failure_cooldown_s=5.0, clock=clock)
    reg.upsert(_reg("gone"))
    reg.upsert(_reg("slow"))
    gone, slow = reg.get("gone"), reg.get("slow")
    assert isinstance(gone.breaker, CircuitBreaker)
    reg.mark_failed(gone, hard=True)
    reg.mark_failed(slow, hard=True)
    clock.t += 1.0
    # both failing, both heartbeating recently: panic mode tries both
    assert {w.id for w in reg.candidates("decode", "m")} == {"gone", "slow"}
    clock.t += 5.0  # 6 s since gone's last heartbeat (> 2 intervals of 2.5 s), still < the 10 s TTL
    reg.upsert(_reg("slow"))  # slow still heartbeats
    reg.mark_failed(reg.get("slow"), hard=True)
    assert [w.id for w in reg.candidates("decode", "m")] == ["slow"]
    # if every failing worker is silent, they are still tried rather than failing without trying
    clock.t += 6.0
    assert {w.id for w in reg.candidates("decode", "m")} <= {"gone", "slow"}
    assert reg.candidates("decode", "m")


def test_worker_connect_timeout_default_is_short():
    assert RouterConfig().connect_timeout_s <= 1.0


def test_pdmesh_status_lists_workers_with_their_tier_stats(harness, capsys):
    tier = FastAPI()

    @tier.get("/stats")
    async def stats(request: Request):
        if request.headers.get("X-PDMesh-Token") != TOKEN:
            return JSONResponse({"detail": "token"}, 401)
        return {
            "memory": {"used_bytes": 3 << 20, "capacity_bytes": 64 << 20, "ready": 3, "hits": 7},
            "transfer": {"push": {"pushes": 2, "failures": 0}, "receive": {"committed": 0}},
        }

    srv = ThreadServer(tier).start()
    try:
        harness.add("prefill", "p0", tier_url=srv.url)
        harness.add("decode", "d0", tier_url=f"http://127.0.0.1:{free_port()}")  # a tier that is down
        assert main(["status", "--router", harness.url, "--token", TOKEN]) == 0
        out = capsys.readouterr().out
        p0 = next(ln for ln in out.splitlines() if ln.startswith("p0"))
        assert "prefill" in p0 and srv.url in p0 and "3/64 MiB" in p0 and "hits 7" in p0 and "pushes 2" in p0
        d0 = next(ln for ln in out.splitlines() if ln.startswith("d0"))
        assert "down" in d0
        assert main(["status", "--router", harness.url, "--token", "wrong"]) == 1
        assert "refused the cluster token" in capsys.readouterr().err
    finally:
        srv.stop()


def test_router_edge_closes_slowloris_and_caps_connections():
    """Before a request exists a client costs bounded time and one connection slot, never more."""
    import socket
    import time

    from pdmesh.http_guard import guarded_protocol
    from pdmesh.router.app import create_app

    app = create_app(RouterConfig(cluster_token=TOKEN))
    srv = ThreadServer(app, http=guarded_protocol(header_timeout_s=1.0, max_connections=3)).start()
    port = int(srv.url.rsplit(":", 1)[1])
    try:
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a head that never completes
        time.sleep(0.2)
        extra = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        assert extra[-1].recv(1) == b""  # over the cap of 3: closed at once
        t0 = time.monotonic()
        assert silent.recv(1) == b"" and slow.recv(1) == b""  # both closed at the header deadline
        assert time.monotonic() - t0 < 3
        ok = socket.create_connection(("127.0.0.1", port), timeout=10)
        ok.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.recv(64).startswith(b"HTTP/1.1 ")  # complete heads are served
        # answered before its body (too large: 413): the connection closes instead of waiting for the body
        early = socket.create_connection(("127.0.0.1", port), timeout=10)
        early.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n{")
        got = b""
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8:
            try:
                chunk = early.recv(4096)
            except ConnectionResetError:  # closed with our unread body bytes in its buffer
                break
            if not chunk:
                break
            got += chunk
            with contextlib.suppress(OSError):  # trickle the rest of the body (until the server closes)
                early.sendall(b" ")
            time.sleep(0.2)
        assert got.startswith(b"HTTP/1.1 413") and time.monotonic() - t0 < 3
        early.close()
        for s in (silent, slow, ok, *extra):
            s.close()
    finally:
        srv.stop()


def test_streamed_requests_are_counted_against_the_configured_slos(make_harness):
    """slo.ttft_s / slo.itl_s: each streamed request counts once per signal, met or not; unset: nothing counted."""
    h = make_harness(slo={"ttft_s": 0.5, "itl_s": 0.05})
    h.add("prefill", "p0")
    d = h.add("decode", "d0")
    body = {"model": "m", "prompt": "a b c", "max_tokens": 4, "stream": True}
    for delay in (0.01, 0.01, 0.12):  # the last one's chunks come 120 ms apart: above the ITL goal
        d.chunk_delay_s = delay
        with h.client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            r.read()
    assert h.metric("pdmesh_router_slo_requests_total", signal="ttft", met="true") == 3
    assert h.metric("pdmesh_router_slo_requests_total", signal="ttft", met="false") == 0
    assert h.metric("pdmesh_router_slo_requests_total", signal="itl", met="true") == 2
    assert h.metric("pdmesh_router_slo_requests_total", signal="itl", met="false") == 1
    d.chunk_delay_s, d.die_after_chunks = 0.0, 1  # the stream breaks after its first token: ITL not counted
    with h.client.stream("POST", "/v1/completions", json=body) as r:
        r.read()
    assert h.metric("pdmesh_router_slo_requests_total", signal="ttft", met="true") == 4
    assert h.metric("pdmesh_router_slo_requests_total", signal="itl", met="true") == 2
    off = make_harness()
    off.add("prefill", "p0")
    off.add("decode", "d0")
    with off.client.stream("POST", "/v1/completions", json=body) as r:
        r.read()
    assert "pdmesh_router_slo_requests_total{" not in off.client.get("/metrics").text  # no sample
