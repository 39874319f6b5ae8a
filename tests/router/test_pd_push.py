"""Router in push PD mode against fake workers: the legs carry the pdmesh transfer fields, fallbacks work."""

from __future__ import annotations

from pdmesh.security import push_target_signed
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
    assert push_target_signed(params["sig"], TOKEN, params["transfer_id"], "10.2.2.2:7002", 1234)
    assert not push_target_signed(params["sig"], TOKEN, params["transfer_id"], "evil:1", 1234)
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
