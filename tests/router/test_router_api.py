"""Router behaviour against fake workers: PD protocol, errors, health, auth, limits, streaming failures."""

from __future__ import annotations

import json

import httpx
import pytest

from pdmesh.procs import free_port
from tests.router.fake_worker import FakeWorker
from tests.servers import ThreadServer

COMPLETION = {"model": "m", "prompt": "hello there", "max_tokens": 4}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    assert {"type", "code", "param"} <= set(err)
    return err


def sse_events(text: str) -> list[str]:
    return [block[len("data: ") :] for block in text.split("\n\n") if block.startswith("data: ")]


def test_health_needs_both_roles(harness):
    r = harness.client.get("/health")
    assert r.status_code == 503
    assert "no healthy prefill" in r.json()["reason"] and "decode" in r.json()["reason"]
    harness.add("prefill")
    r = harness.client.get("/health")
    assert r.status_code == 503 and "decode" in r.json()["reason"] and "prefill" not in r.json()["reason"]
    harness.add("decode")
    r = harness.client.get("/health")
    assert r.status_code == 200 and r.json()["prefill_workers"] == 1


def test_pd_legs_follow_stock_nixl_protocol(harness):
    p = harness.add("prefill")
    d = harness.add("decode")
    body = {
        **COMPLETION,
        "stream_options": {"include_usage": True},
        "kv_transfer_params": {"remote_host": "evil"},
    }
    r = harness.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "t0 t1 t2 t3"
    (pre,) = p.requests
    assert pre["max_tokens"] == 1 and pre["stream"] is False and "stream_options" not in pre
    assert pre["kv_transfer_params"]["do_remote_decode"] is True
    assert pre["kv_transfer_params"]["remote_host"] is None  # the client's value never reaches a worker
    (dec,) = d.requests
    assert dec["kv_transfer_params"]["remote_engine_id"] == p.name
    assert dec["max_tokens"] == 4
    rid = r.headers["x-request-id"]
    assert p.headers[0]["x-request-id"] == rid == d.headers[0]["x-request-id"]
    assert harness.metric("pdmesh_router_pd_requests_total", mode="nixl") == 1


def test_chat_stream_relayed_with_done(harness):
    harness.add("prefill")
    harness.add("decode")
    with harness.client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == ["t0 ", "t1 ", "t2 "]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"prompt": "x"}).encode(), "model"),
        (json.dumps({"model": "m"}).encode(), "prompt"),
        (json.dumps({**COMPLETION, "max_tokens": "abc"}).encode(), "max_tokens"),
        (json.dumps({**COMPLETION, "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({**COMPLETION, "max_tokens": -5}).encode(), "max_tokens"),
        (json.dumps({**COMPLETION, "stream": "yes please"}).encode(), "stream"),
        (json.dumps({**COMPLETION, "prompt": []}).encode(), "prompt"),
        (json.dumps({**COMPLETION, "stream": "false"}).encode(), "stream"),  # truthy, would have streamed
        (json.dumps({**COMPLETION, "max_tokens": True}).encode(), "max_tokens"),
        (json.dumps({**COMPLETION, "n": 1.0}).encode(), "n"),
        (b'{"model": "m", "prompt": "\xff\xfe"}', None),  # not UTF-8
        (b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),  # 100k-deep JSON
    ],
)
def test_bad_completion_input_is_400(harness, payload, param):
    harness.add("prefill")
    harness.add("decode")
    r = harness.client.post("/v1/completions", content=payload, headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400)
    if param:
        assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_internal_fields_never_reach_a_worker_even_inside_vllm_xargs(harness):
    harness.add("prefill")
    d = harness.add("decode")
    body = {**COMPLETION, "kv_transfer_params": {"pdmesh": {"push_to": "evil:1"}}}
    body["vllm_xargs"] = {"kv_transfer_params": "boom", "keep": 1}
    r = harness.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    sent = d.requests[-1]
    assert "kv_transfer_params" not in (sent.get("vllm_xargs") or {})
    assert sent["vllm_xargs"] == {"keep": 1}
    assert "evil" not in json.dumps(sent)


def test_bad_chat_input_is_400(harness):
    harness.add("prefill")
    harness.add("decode")
    for body in (
        {"model": "m"},
        {"model": "m", "messages": []},
        {"model": "m", "messages": [{"content": "x"}]},
    ):
        assert_openai_error(harness.client.post("/v1/chat/completions", json=body), 400)


def test_unknown_model_404_and_no_workers_503(harness):
    err = assert_openai_error(harness.client.post("/v1/completions", json=COMPLETION), 503)
    assert "no workers" in err["message"]
    harness.add("prefill")
    harness.add("decode")
    err = assert_openai_error(
        harness.client.post("/v1/completions", json={**COMPLETION, "model": "nope"}), 404
    )
    assert err["code"] == "model_not_found" and "available: m" in err["message"]


def test_prompt_too_long_relays_worker_400(harness):
    p = harness.add("prefill")
    harness.add("decode")
    long_prompt = " ".join(["w"] * (p.max_model_len + 1))
    err = assert_openai_error(
        harness.client.post("/v1/completions", json={**COMPLETION, "prompt": long_prompt}), 400
    )
    assert "max_model_len" in err["message"]


def test_only_decode_role_missing_gives_503(harness):
    harness.add("prefill")
    err = assert_openai_error(harness.client.post("/v1/completions", json=COMPLETION), 503)
    assert err["code"] in ("no_workers", "PD_PEER_UNAVAILABLE")


def test_dead_worker_is_skipped_and_retried(harness):
    harness.register("prefill-dead", "prefill", f"http://127.0.0.1:{free_port()}")
    live = harness.add("prefill", name="prefill-live")
    harness.add("decode")
    for _ in range(3):
        r = harness.client.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 200, r.text
    assert len(live.requests) == 3
    assert harness.metric("pdmesh_router_retries_total", leg="prefill") >= 1


@pytest.mark.parametrize("status", [500, 503, 307], ids=["500", "503", "redirect"])
def test_worker_fault_retried_on_another(harness, status):
    """A worker's 5xx, or a redirect (a worker never redirects: its URL is wrong), is the worker's fault."""
    bad = harness.add("decode", name="decode-bad")
    bad.fail_status = status
    good = harness.add("decode", name="decode-good")
    harness.add("prefill")
    for _ in range(2):
        assert harness.client.post("/v1/completions", json=COMPLETION).status_code == 200
    assert len(good.requests) == 2
    if status >= 500:
        return
    good.fail_status = 302
    err = assert_openai_error(harness.client.post("/v1/completions", json=COMPLETION), 502)
    assert err["code"] == "PD_PEER_UNAVAILABLE"


def test_slow_request_body_is_408(make_harness):
    import socket

    h = make_harness(body_timeout_s=0.5)
    h.add("prefill")
    h.add("decode")
    with socket.create_connection(("127.0.0.1", h.server.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": '
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            part = s.recv(65536)
            if not part:
                break
            data += part
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert b"body_timeout" in data


def test_deregistration_refuses_bad_worker_ids(harness):
    r = harness.client.delete("/internal/workers/p0%3Fx", headers={"X-PDMesh-Token": "test-cluster-token"})
    assert_openai_error(r, 400)


def test_all_workers_dead_is_503_not_500(harness):
    harness.register("p", "prefill", f"http://127.0.0.1:{free_port()}")
    harness.register("d", "decode", f"http://127.0.0.1:{free_port()}")
    err = assert_openai_error(harness.client.post("/v1/completions", json=COMPLETION), 503)
    assert err["code"] == "PD_PEER_UNAVAILABLE"


def test_stream_broken_mid_way_ends_with_error_event(harness):
    harness.add("prefill")
    d = harness.add("decode")
    d.die_after_chunks = 2
    with harness.client.stream(
        "POST", "/v1/completions", json={**COMPLETION, "max_tokens": 6, "stream": True}
    ) as r:
        assert r.status_code == 200
        text = r.read().decode()
    events = sse_events(text)
    assert "[DONE]" not in events
    err = json.loads(events[-1])["error"]
    assert err["code"] == "PD_PEER_UNAVAILABLE"
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == ["t0 ", "t1 "]
    assert harness.metric("pdmesh_router_stream_errors_total") == 1
    # The router keeps serving.
    d.die_after_chunks = None
    assert harness.client.post("/v1/completions", json=COMPLETION).status_code == 200


def test_registration_requires_cluster_token(harness):
    r = harness.client.post(
        "/internal/workers",
        json={"worker_id": "w", "role": "decode", "url": "http://127.0.0.1:1", "models": ["m"]},
    )
    assert_openai_error(r, 403)
    r = harness.client.post(
        "/internal/workers",
        json={"worker_id": "w", "role": "decode", "url": "http://127.0.0.1:1", "models": ["m"]},
        headers={"X-PDMesh-Token": "wrong"},
    )
    assert_openai_error(r, 403)
    assert_openai_error(harness.client.get("/internal/workers"), 403)
    assert_openai_error(harness.client.delete("/internal/workers/w"), 403)


def test_bad_registration_is_400(harness):
    r = harness.client.post(
        "/internal/workers",
        json={"worker_id": "w", "role": "weird", "url": "ftp://x", "models": []},
        headers={"X-PDMesh-Token": "test-cluster-token"},
    )
    assert_openai_error(r, 400)


def test_api_keys_and_body_limit(make_harness):
    h = make_harness(api_keys=["k1", "k2"], max_body_bytes=1000)
    h.add("prefill")
    h.add("decode")
    assert_openai_error(h.client.post("/v1/completions", json=COMPLETION), 401)
    assert_openai_error(
        h.client.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer no"}), 401
    )
    assert_openai_error(h.client.get("/v1/models"), 401)
    ok = h.client.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer k2"})
    assert ok.status_code == 200
    big = {**COMPLETION, "prompt": "x" * 5000}
    err = assert_openai_error(
        h.client.post("/v1/completions", json=big, headers={"Authorization": "Bearer k1"}), 413
    )
    assert err["code"] == "body_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b"x" * 500

    err = assert_openai_error(
        h.client.post(
            "/v1/completions",
            content=chunked(),
            headers={"Authorization": "Bearer k1", "Content-Type": "application/json"},
        ),
        413,
    )
    assert err["code"] == "body_too_large"


def test_completion_routes_take_post_only(harness):
    harness.add("prefill")
    harness.add("decode")
    for path in ("/v1/completions", "/v1/chat/completions"):
        err = assert_openai_error(harness.client.get(path), 405)
        assert err["code"] == "method_not_allowed"
    ok = harness.client.post("/v1/completions", json=COMPLETION)
    assert ok.status_code == 200 and ok.headers["x-request-id"].startswith("pdm-")


def test_models_lists_registered_models(harness):
    harness.add("prefill", model="a")
    harness.add("decode", model="a")
    data = harness.client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["a"]


def test_heartbeat_expiry_and_deregistration(make_harness):
    import time

    h = make_harness(heartbeat_ttl_s=2.0)
    h.add("prefill")
    h.add("decode")
    assert h.client.get("/health").status_code == 200  # well within the TTL, even on a loaded machine
    deadline = time.monotonic() + 20
    while h.client.get("/health").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert h.client.get("/health").status_code == 503
    h.register("d2", "decode", h.workers[1][1].url)
    r = h.client.delete("/internal/workers/d2", headers={"X-PDMesh-Token": "test-cluster-token"})
    assert r.json() == {"removed": True}


def test_unknown_route_is_openai_404(harness):
    assert_openai_error(harness.client.get("/v1/nothing"), 404)


def test_https_workers_verified_with_the_configured_ca(make_harness, tls_cert):
    cert, key = tls_cert
    h = make_harness(worker_ca_file=cert)
    for role in ("prefill", "decode"):
        fw = FakeWorker(f"{role}-tls")
        srv = ThreadServer(fw.app, ssl_certfile=cert, ssl_keyfile=key).start()
        h.workers.append((fw, srv))
        h.register(fw.name, role, srv.url)
    r = h.client.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200, r.text
    assert [len(fw.requests) for fw, _ in h.workers] == [1, 1]
    # A router without the CA does not trust these workers: the legs fail, the client gets a clean 503.
    h2 = make_harness()
    for fw, srv in h.workers:
        h2.register(fw.name, "prefill" if "prefill" in fw.name else "decode", srv.url)
    err = assert_openai_error(h2.client.post("/v1/completions", json=COMPLETION), 503)
    assert err["code"] == "PD_PEER_UNAVAILABLE"
