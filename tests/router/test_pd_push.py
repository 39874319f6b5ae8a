"""Router in push PD mode against fake workers: the legs carry the pdmesh transfer fields, fallbacks work."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from pdmesh.security import PUSH_KIND, push_grant_refusal
from tests.router.conftest import TOKEN
from tests.router.fake_worker import FakeWorker
from tests.servers import ThreadServer

COMPLETION = {"model": "m", "prompt": "hello there", "max_tokens": 4}


def _add(h, role: str, name: str, transfer_address: str | None) -> FakeWorker:
    fw = FakeWorker(name)
    srv = ThreadServer(fw.app).start()
    h.workers.append((fw, srv))
    body = {"worker_id": name, "role": role, "url": srv.url, "models": ["m"]}
    if transfer_address:
        body["transfer_address"] = transfer_address
    h.client.post("/internal/workers", json=body, headers={"X-PDMesh-Token": TOKEN}).raise_for_status()
    return fw


def _wait_until(condition, timeout_s: float) -> None:
    """Poll ``condition`` until it is truthy or ``timeout_s`` passed (the caller asserts afterwards)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_push_legs_carry_transfer_fields(make_harness):
    h = make_harness(pd_mode="push", pd_transfer_deadline_ms=1234)
    p = _add(h, "prefill", "p0", "10.1.1.1:7001")
    d = _add(h, "decode", "d0", "10.2.2.2:7002")
    r = h.client.post(
        "/v1/completions", json={**COMPLETION, "kv_transfer_params": {"pdmesh": {"push_to": "evil:1"}}}
    )
    assert r.status_code == 200, r.text
    (pre,) = p.requests
    assert pre["max_tokens"] == 1 and pre["stream"] is False
    params = pre["kv_transfer_params"]["pdmesh"]
    assert params["push_to"] == "10.2.2.2:7002" and params["deadline_ms"] == 1234
    # the router vouches for the target: the connector checks this with the cluster token
    ids = FakeWorker.token_ids(COMPLETION) if "prompt" in params else None
    assert push_grant_refusal(params, TOKEN, PUSH_KIND, ids) is None
    assert push_grant_refusal(params, TOKEN, PUSH_KIND, [7, 7, 7]) in (None, "granted for another prompt")
    assert push_grant_refusal({**params, "push_to": "evil:1"}, TOKEN, PUSH_KIND) == "bad signature"
    assert params["expires_ms"] > params["deadline_ms"] and len(params["nonce"]) >= 16
    (dec,) = d.requests
    assert dec["kv_transfer_params"] == {
        "pdmesh": {"transfer_id": params["transfer_id"], "deadline_ms": 1234}
    }
    assert dec["max_tokens"] == 4
    assert h.metric("pdmesh_router_pd_requests_total", mode="push") == 1


def test_prefill_down_falls_back_to_decode_only(make_harness):
    h = make_harness(pd_mode="push")
    p = _add(h, "prefill", "p0", "10.1.1.1:7001")
    p.fail_status = 500
    d = _add(h, "decode", "d0", "10.2.2.2:7002")
    r = h.client.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200, r.text
    (dec,) = d.requests
    assert "kv_transfer_params" not in dec  # nothing was pushed: D must not wait for a transfer
    assert h.metric("pdmesh_router_pd_requests_total", mode="fallback") == 1
    assert h.metric("pdmesh_router_pd_requests_total", mode="decode_only") == 1


def test_decode_leg_waits_for_the_prefill_leg_by_default(make_harness):
    h = make_harness(pd_mode="push")
    p = _add(h, "prefill", "p0", "10.1.1.1:7001")
    p.delay_s = 0.5
    d = _add(h, "decode", "d0", "10.2.2.2:7002")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(h.client.post, "/v1/completions", json=COMPLETION)
        time.sleep(0.3)
        assert len(p.requests) == 1 and not d.requests  # P is working; D has not been asked yet
        assert pending.result().status_code == 200
    assert len(d.requests) == 1


def test_overlapped_prefill_failure_cancels_the_waiting_decode_leg(make_harness):
    h = make_harness(pd_mode="push", pd_overlap_legs=True)
    p = _add(h, "prefill", "p0", "10.1.1.1:7001")
    p.fail_status = 500
    d = _add(h, "decode", "d0", "10.2.2.2:7002")
    d.delay_s = 0.5  # the PD decode leg waits (for pushed KV) while the prefill leg fails
    r = h.client.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200, r.text
    pd_leg, plain = d.requests
    assert "kv_transfer_params" in pd_leg  # dispatched with the prefill leg ...
    assert d.cancelled == 1  # ... and aborted on D when the prefill leg failed
    assert "kv_transfer_params" not in plain  # nothing was pushed: D must not wait for a transfer
    assert h.metric("pdmesh_router_pd_requests_total", mode="fallback") == 1
    assert h.metric("pdmesh_router_pd_requests_total", mode="decode_only") == 1


def test_overlapped_decode_leg_starts_while_prefill_leg_runs(make_harness):
    """The decode worker already waits for the pushed chunks: it gets its leg without waiting for P's answer."""
    h = make_harness(pd_mode="push", pd_overlap_legs=True)
    p = _add(h, "prefill", "p0", "10.1.1.1:7001")
    p.delay_s = 1.5
    d = _add(h, "decode", "d0", "10.2.2.2:7002")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(h.client.post, "/v1/completions", json=COMPLETION)
        _wait_until(lambda: d.requests, 1.0)
        assert d.requests and not pending.done()  # D has its leg, P has not answered yet
        r = pending.result()
    assert r.status_code == 200, r.text
    assert h.metric("pdmesh_router_pd_requests_total", mode="push") == 1


def test_overlapped_decode_leg_failure_cancels_the_prefill_leg(make_harness):
    h = make_harness(pd_mode="push", pd_overlap_legs=True)
    p = _add(h, "prefill", "p0", "10.1.1.1:7001")
    p.delay_s = 5.0
    d = _add(h, "decode", "d0", "10.2.2.2:7002")
    d.fail_prompt = COMPLETION["prompt"]  # a 400: the client's error, not retried
    r = h.client.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 400, r.text
    _wait_until(lambda: p.cancelled, 3.0)
    assert p.cancelled == 1  # the prefill worker was told to stop (its connection closed)


def test_decode_retry_goes_to_another_worker_without_transfer_fields(make_harness):
    h = make_harness(pd_mode="push")
    _add(h, "prefill", "p0", "10.1.1.1:7001")
    bad = _add(h, "decode", "d0", "10.2.2.2:7002")
    bad.fail_status = 503
    good = _add(h, "decode", "d1", "10.2.2.3:7002")
    for _ in range(2):
        r = h.client.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 200, r.text
    for req in good.requests:
        params = (req.get("kv_transfer_params") or {}).get("pdmesh")
        # either D1 was the push target (then it waits for the transfer) or it got the plain request
        assert params is None or set(params) == {"transfer_id", "deadline_ms"}
    assert good.requests
