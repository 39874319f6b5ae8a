"""Production behaviour against fake workers: breaker, retries before the first byte only, deadline, client
disconnect, limits (429), auth/body bodies, cache-aware choice, tier lookup source, conditional PD, discovery."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pdmesh.procs import free_port
from pdmesh.router.discovery import Discovery
from pdmesh.router.registration import WorkerRegistration
from pdmesh.router.registry import Registry, Worker
from pdmesh.router.tier_lookup import HttpTierLookup, lookup_all
from tests.router.conftest import TOKEN
from tests.router.fake_worker import FakeWorker
from tests.router.test_router_api import COMPLETION, assert_openai_error, sse_events
from tests.servers import ThreadServer


def wait_until(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_breaker_opens_then_closes_after_recovery(make_harness):
    h = make_harness(breaker={"failures": 2, "open_s": 0.3}, retry={"backoff_s": 0})
    bad = h.add("decode", name="d-bad")
    good = h.add("decode", name="d-good")
    h.add("prefill")
    bad.fail_status = 500
    for _ in range(6):
        assert h.client.post("/v1/completions", json=COMPLETION).status_code == 200
    assert len(bad.requests) == 2  # two failures opened the breaker; later requests skip it
    assert h.metric("pdmesh_router_worker_breaker_open", worker="d-bad") == 1
    workers = {
        w["worker_id"]: w for w in h.client.get("/internal/workers", headers={"X-PDMesh-Token": TOKEN}).json()
    }
    assert workers["d-bad"]["breaker"] == "open"
    bad.fail_status = None
    time.sleep(0.35)  # open interval over: one trial request is let through, succeeds, breaker closes
    for _ in range(4):
        assert h.client.post("/v1/completions", json=COMPLETION).status_code == 200
    assert len(bad.requests) >= 4 and len(good.requests) >= 4
    assert h.metric("pdmesh_router_worker_breaker_open", worker="d-bad") == 0


def test_retry_happens_before_first_byte_only(harness):
    harness.add("prefill")
    d0 = harness.add("decode", name="d0")
    d1 = harness.add("decode", name="d1")
    for d in (d0, d1):
        d.die_after_chunks = 1
    with harness.client.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as r:
        events = sse_events(r.read().decode())
    assert json.loads(events[-1])["error"]["code"] == "PD_PEER_UNAVAILABLE"
    # the stream broke after its first byte: exactly one decode attempt, no retry on the other worker
    assert len(d0.requests) + len(d1.requests) == 1
    assert harness.metric("pdmesh_router_retries_total", leg="decode") == 0


def test_deadline_before_first_byte_is_504(make_harness):
    h = make_harness(request_deadline_s=0.3)
    p = h.add("prefill")
    h.add("decode")
    p.delay_s = 3
    t0 = time.monotonic()
    err = assert_openai_error(h.client.post("/v1/completions", json=COMPLETION), 504)
    assert err["code"] == "PD_DEADLINE_EXCEEDED"
    assert time.monotonic() - t0 < 2.5
    assert wait_until(lambda: p.cancelled == 1)  # the prefill leg was cancelled upstream
    assert h.metric("pdmesh_router_errors_total", reason="PD_DEADLINE_EXCEEDED") == 1


def test_deadline_mid_stream_ends_with_error_event(make_harness):
    h = make_harness(request_deadline_s=0.5)
    h.add("prefill")
    d = h.add("decode")
    d.chunk_delay_s = 0.2
    with h.client.stream(
        "POST", "/v1/completions", json={**COMPLETION, "max_tokens": 20, "stream": True}
    ) as r:
        assert r.status_code == 200
        events = sse_events(r.read().decode())
    assert json.loads(events[-1])["error"]["code"] == "PD_DEADLINE_EXCEEDED"
    assert 1 <= len(events) - 1 < 20
    assert wait_until(lambda: d.cancelled == 1)


def _raw_request(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s


def test_disconnect_during_prefill_cancels_it_and_skips_decode(harness):
    p = harness.add("prefill")
    d = harness.add("decode")
    p.delay_s = 5
    s = _raw_request(harness.url, COMPLETION)
    assert wait_until(lambda: len(p.requests) == 1)
    s.close()
    assert wait_until(lambda: p.cancelled == 1)
    assert d.requests == []
    assert wait_until(lambda: harness.metric("pdmesh_router_errors_total", reason="CLIENT_DISCONNECTED") == 1)
    assert all(
        w["in_flight"] == 0
        for w in harness.client.get("/internal/workers", headers={"X-PDMesh-Token": TOKEN}).json()
    )


def test_disconnect_mid_stream_cancels_decode(harness):
    harness.add("prefill")
    d = harness.add("decode")
    d.chunk_delay_s = 0.1
    s = _raw_request(harness.url, {**COMPLETION, "max_tokens": 100, "stream": True})
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    assert wait_until(lambda: d.cancelled == 1)
    assert wait_until(
        lambda: all(
            w["in_flight"] == 0
            for w in harness.client.get("/internal/workers", headers={"X-PDMesh-Token": TOKEN}).json()
        )
    )


def test_rate_and_concurrency_limits_are_429_with_retry_after(make_harness):
    h = make_harness(api_keys=["k1", "k2"], limits={"per_key_rate_per_s": 0.01, "per_key_burst": 2})
    h.add("prefill")
    h.add("decode")
    k1 = {"Authorization": "Bearer k1"}
    for _ in range(2):
        assert h.client.post("/v1/completions", json=COMPLETION, headers=k1).status_code == 200
    r = h.client.post("/v1/completions", json=COMPLETION, headers=k1)
    err = assert_openai_error(r, 429)
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    assert (
        h.client.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer k2"}).status_code
        == 200
    )
    assert h.metric("pdmesh_router_requests_total", status="429") == 1

    g = make_harness(limits={"max_concurrency": 1})
    g.add("prefill")
    dec = g.add("decode")
    dec.chunk_delay_s = 0.3
    with g.client.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as held:
        assert held.status_code == 200
        r = g.client.post("/v1/completions", json=COMPLETION)
        assert_openai_error(r, 429)
        assert r.headers["retry-after"] == "1"
        held.read()
    assert wait_until(lambda: g.client.post("/v1/completions", json=COMPLETION).status_code == 200)


def test_auth_and_body_limit_bodies(make_harness):
    h = make_harness(api_keys=["k"], max_body_bytes=200)
    h.add("prefill")
    h.add("decode")
    err = assert_openai_error(h.client.post("/v1/chat/completions", json={}), 401)
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    err = assert_openai_error(
        h.client.post(
            "/v1/completions", json={**COMPLETION, "prompt": "x" * 500}, headers={"Authorization": "Bearer k"}
        ),
        413,
    )
    assert err["code"] == "body_too_large" and "200 bytes" in err["message"]


def test_internal_headers_from_clients_are_not_forwarded(harness):
    p = harness.add("prefill")
    d = harness.add("decode")
    r = harness.client.post(
        "/v1/completions",
        json=COMPLETION,
        headers={"X-Request-Id": "evil", "X-PDMesh-Token": "x", "X-Forwarded-For": "1"},
    )
    assert r.status_code == 200
    for hdrs in (p.headers[0], d.headers[0]):
        assert (
            hdrs["x-request-id"].startswith("pdm-")
            and "x-pdmesh-token" not in hdrs
            and "x-forwarded-for" not in hdrs
        )


def test_cache_aware_prefill_follows_the_templated_prompt(make_harness):
    h = make_harness(policies={"prefill": "cache_aware"}, cache_aware={"chunk_tokens": 4})
    p0 = h.add("prefill", name="p0")
    p1 = h.add("prefill", name="p1")
    h.add("decode")
    system = {"role": "system", "content": " ".join(f"w{i}" for i in range(40))}
    convo = {
        "model": "m",
        "max_tokens": 2,
        "messages": [system, {"role": "user", "content": "a b c d e f g h"}],
    }
    assert h.client.post("/v1/chat/completions", json=convo).status_code == 200
    first = p0 if p0.requests else p1
    # same system prompt, different user turn: the worker holding the prefix is chosen every time
    for turn in range(6):
        body = {**convo, "messages": [system, {"role": "user", "content": f"q{turn} " * 8}]}
        assert h.client.post("/v1/chat/completions", json=body).status_code == 200
    assert len(first.requests) == 7
    assert first.tokenize_calls + (p1 if first is p0 else p0).tokenize_calls == 7
    assert "messages" in first.requests[0]  # tokenize saw the whole conversation, not the first message
    assert h.metric("pdmesh_router_cached_prefix_tokens_total") > 0


def test_cache_aware_falls_back_to_text_keys_without_tokenizer(make_harness):
    h = make_harness(policies={"prefill": "cache_aware"}, cache_aware={"chunk_chars": 16})
    p0 = h.add("prefill", name="p0")
    p1 = h.add("prefill", name="p1")
    h.add("decode")
    p0.tokenize_status = p1.tokenize_status = 404
    prefix = "shared document " * 20
    for i in range(5):
        r = h.client.post("/v1/completions", json={**COMPLETION, "prompt": prefix + f"question {i}"})
        assert r.status_code == 200
    assert sorted([len(p0.requests), len(p1.requests)]) == [0, 5]
    assert p0.tokenize_calls + p1.tokenize_calls <= 2  # a worker without /tokenize is not asked again


def test_tier_lookup_source_against_a_fake_tier():
    seen: list[dict] = []
    app = FastAPI()

    @app.post("/lookup")
    async def lookup(request: Request):
        if request.headers.get("x-pdmesh-token") != TOKEN:
            return JSONResponse({"error": "forbidden"}, 403)
        body = await request.json()
        seen.append(body)
        return {"chunks": 2, "tokens": 256, "total_chunks": 3, "tiers": ["memory", "remote"]}

    tier = ThreadServer(app).start()
    try:

        async def run() -> tuple[dict, int | None, int | None]:
            async with httpx.AsyncClient(trust_env=False) as client:
                src = HttpTierLookup(client, TOKEN, timeout_s=2.0)
                with_tier = Worker(
                    WorkerRegistration(
                        worker_id="a", role="prefill", url="http://x:1", models=["m"], tier_url=tier.url
                    ),
                    0.0,
                    breaker=Registry(1, 1)
                    ._new(
                        WorkerRegistration(worker_id="z", role="prefill", url="http://x:1", models=["m"]),
                        "static",
                    )
                    .breaker,
                )
                dead = Worker(
                    WorkerRegistration(
                        worker_id="b",
                        role="prefill",
                        url="http://x:1",
                        models=["m"],
                        tier_url=f"http://127.0.0.1:{free_port()}",
                    ),
                    0.0,
                    breaker=with_tier.breaker,
                )
                all_ = await lookup_all(src, [with_tier, dead], [1, 2, 3])
                wrong = await HttpTierLookup(client, "bad", 2.0).cached_tokens(with_tier, [1])
                return all_, await src.cached_tokens(dead, [1]), wrong

        found, dead_answer, wrong_token = asyncio.run(run())
    finally:
        tier.stop()
    assert found == {"a": 256}
    assert dead_answer is None and wrong_token is None  # unknown, never an exception
    assert seen[0] == {"token_ids": [1, 2, 3]}


def test_tier_lookup_steers_cache_aware_choice(make_harness):
    app = FastAPI()

    @app.post("/lookup")
    async def lookup():
        return {"chunks": 1, "tokens": 64, "total_chunks": 1, "tiers": ["disk"]}

    tier = ThreadServer(app).start()
    try:
        h = make_harness(policies={"prefill": "cache_aware"}, cache_aware={"tier_lookup_timeout_s": 2.0})
        h.add("prefill", name="p0")
        p1 = h.add("prefill", name="p1", tier_url=tier.url)
        h.add("decode")
        for i in range(3):
            assert (
                h.client.post("/v1/completions", json={**COMPLETION, "prompt": f"x{i} y z"}).status_code
                == 200
            )
        assert len(p1.requests) == 3
    finally:
        tier.stop()


@pytest.mark.parametrize("mode", ["push", "nixl"])
def test_conditional_pd_sends_short_prompts_decode_only(make_harness, mode):
    h = make_harness(
        pd_mode=mode,
        conditional_pd={"min_uncached_tokens": 10, "idle_decoder_max_uncached_tokens": 0},
        cache_aware={"chunk_tokens": 4},
    )
    p = h.add("prefill", transfer_address="10.0.0.1:7000")
    d = h.add("decode", transfer_address="10.0.0.2:7000")
    assert h.client.post("/v1/completions", json={**COMPLETION, "prompt": "a b c"}).status_code == 200
    assert p.requests == [] and "kv_transfer_params" not in d.requests[0]
    assert h.metric("pdmesh_router_decode_only_total", reason="short_prompt") == 1
    long_prompt = " ".join(f"w{i}" for i in range(30))
    assert h.client.post("/v1/completions", json={**COMPLETION, "prompt": long_prompt}).status_code == 200
    assert len(p.requests) == 1
    # the same long prompt again: D holds it now, so its uncached part is short -> decode-only
    assert (
        h.client.post("/v1/completions", json={**COMPLETION, "prompt": long_prompt + " q"}).status_code == 200
    )
    assert len(p.requests) == 1


def test_several_models_route_by_model(harness):
    pa = harness.add("prefill", name="pa", model="a")
    da = harness.add("decode", name="da", model="a")
    pb = harness.add("prefill", name="pb", model="b")
    db = harness.add("decode", name="db", model="b")
    for model in ("a", "b", "b"):
        assert harness.client.post("/v1/completions", json={**COMPLETION, "model": model}).status_code == 200
    assert (len(pa.requests), len(da.requests), len(pb.requests), len(db.requests)) == (1, 1, 2, 2)


@pytest.fixture
def fake_servers():
    made: list[ThreadServer] = []

    def start(name: str) -> tuple[FakeWorker, str]:
        fw = FakeWorker(name)
        srv = ThreadServer(fw.app).start()
        made.append(srv)
        return fw, srv.url

    yield start
    for srv in made:
        srv.stop()


def test_static_workers_and_active_health_checks(make_harness, fake_servers):
    _p, p_url = fake_servers("p")
    d0, d0_url = fake_servers("d0")
    d1, d1_url = fake_servers("d1")
    h = make_harness(
        discovery={
            "static": [
                {"url": p_url, "role": "prefill", "models": ["m"]},
                {"url": d0_url, "role": "decode", "models": ["m"], "worker_id": "d0"},
                {"url": d1_url, "role": "decode", "models": ["m"], "worker_id": "d1"},
            ]
        },
        health_check={"interval_s": 0.1, "timeout_s": 1.0, "unhealthy_after": 1},
    )
    assert h.client.get("/health").json()["decode_workers"] == 2
    d1.health_status = 503
    assert wait_until(lambda: h.client.get("/health").json()["decode_workers"] == 1)
    for _ in range(4):
        assert h.client.post("/v1/completions", json=COMPLETION).status_code == 200
    assert len(d0.requests) == 4 and d1.requests == []
    assert h.metric("pdmesh_router_worker_healthy", worker="d1") == 0
    d1.health_status = 200
    assert wait_until(lambda: h.client.get("/health").json()["decode_workers"] == 2)


def test_dns_discovery_resolves_replicas(make_harness, fake_servers):
    _p, p_url = fake_servers("p")
    d, d_url = fake_servers("d")
    port = int(d_url.rsplit(":", 1)[1])
    h = make_harness(
        discovery={
            "static": [{"url": p_url, "role": "prefill", "models": ["m"]}],
            "dns": [
                {"name": "127.0.0.1", "port": port, "role": "decode", "models": ["m"], "transfer_port": 7000}
            ],
            "dns_interval_s": 0.1,
        }
    )
    assert wait_until(lambda: h.client.get("/health").status_code == 200)
    (w,) = [
        w
        for w in h.client.get("/internal/workers", headers={"X-PDMesh-Token": TOKEN}).json()
        if w["source"] == "dns"
    ]
    assert w["url"] == d_url and w["transfer_address"] == "127.0.0.1:7000"
    assert h.client.post("/v1/completions", json=COMPLETION).status_code == 200
    assert len(d.requests) == 1


def test_dns_refresh_adds_and_removes_replicas(monkeypatch):
    from pdmesh.router import discovery as disc
    from pdmesh.router.config import DiscoveryConfig

    answers = [["10.0.0.1", "10.0.0.2"], ["10.0.0.2"], OSError("NXDOMAIN")]

    async def fake_resolve(name: str, port: int) -> list[str]:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    monkeypatch.setattr(disc, "resolve", fake_resolve)
    reg = Registry(10, 1)
    d = Discovery(
        DiscoveryConfig(dns=[{"name": "decoder", "port": 8200, "role": "decode", "models": ["m"]}]), reg
    )
    asyncio.run(d.refresh_dns())
    assert sorted(w.url for w in reg.all()) == ["http://10.0.0.1:8200", "http://10.0.0.2:8200"]
    asyncio.run(d.refresh_dns())
    assert [w.url for w in reg.all()] == ["http://10.0.0.2:8200"]
    asyncio.run(d.refresh_dns())  # resolution failed: keep the previous set
    assert [w.url for w in reg.all()] == ["http://10.0.0.2:8200"]
