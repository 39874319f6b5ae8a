"""A ``/lookup`` of a long prompt never stalls the tier's event loop, which also serves the connector's control
socket (:mod:`pdmesh.kvcache.tier_http`): its key derivation runs in a worker thread, and a lookup of too many
keys is refused before any hashing. A real tier server in a thread; the hashing is slowed down on purpose (one
second) so that the timing is deterministic on a loaded machine."""

from __future__ import annotations

import threading
import time

import httpx

import pdmesh.kvcache.tier_http as tier_http
from pdmesh.kvcache.client import TierClient
from pdmesh.kvcache.keys import ModelFingerprint, chunk_keys

from .conftest import tier_config

FP = ModelFingerprint("tiny", "r0", "float32", "cpu", 32)
TOK = {"X-PDMesh-Token": "tier-token"}
SLOW_S = 1.0


def test_a_lookup_being_hashed_leaves_the_control_socket_and_http_answering(
    tmp_path, tier_factory, monkeypatch
):
    entered, left = threading.Event(), threading.Event()
    real = tier_http.chain_keys

    def slow_chain_keys(*args, **kw):
        entered.set()
        time.sleep(SLOW_S)  # stands for the CPU time of ~1M token ids
        try:
            return real(*args, **kw)
        finally:
            left.set()

    monkeypatch.setattr(tier_http, "chain_keys", slow_chain_keys)
    t = tier_factory(tier_config(tmp_path, fingerprint=FP.to_dict(), chunk_tokens=32))
    toks = list(range(32 * 4))
    keys = chunk_keys(FP, toks, 32)
    control = TierClient(t.config.socket_path, "tier-token", timeout_s=5, fingerprint=FP.to_dict())
    control.put(keys[:3], [k * 100 for k in keys[:3]])
    result: dict = {}

    def big_lookup():
        with httpx.Client(base_url=t.http, timeout=10) as h:
            result["r"] = h.post("/lookup", json={"token_ids": toks}, headers=TOK).json()

    th = threading.Thread(target=big_lookup)
    th.start()
    try:
        assert entered.wait(10)
        t0 = time.monotonic()
        assert control.lookup(keys).n == 3  # the connector's control socket
        with httpx.Client(base_url=t.http, timeout=10) as h:
            assert h.get("/health").json()["status"] == "ok"
            assert (
                h.post("/lookup", json={"keys": [k.hex() for k in keys]}, headers=TOK).json()["chunks"] == 3
            )
        answered_in = time.monotonic() - t0
        assert not left.is_set(), "answered only once the hashing ended: it blocked the event loop"
        assert answered_in < SLOW_S / 2, answered_in
    finally:
        th.join(10)
        control.close()
    assert result["r"] == {"chunks": 3, "tokens": 96, "total_chunks": 4, "tiers": ["memory"] * 3}


def test_a_lookup_of_too_many_keys_is_refused_before_hashing(tmp_path, tier_factory, monkeypatch):
    called = []
    monkeypatch.setattr(tier_http, "chain_keys", lambda *a, **k: called.append(1) or [])
    monkeypatch.setattr(tier_http, "MAX_LOOKUP_KEYS", 100)
    t = tier_factory(tier_config(tmp_path, fingerprint=FP.to_dict(), chunk_tokens=32))
    with httpx.Client(base_url=t.http, timeout=10) as h:
        r = h.post("/lookup", json={"token_ids": list(range(101)), "chunk_tokens": 1}, headers=TOK)
        assert r.status_code == 422 and "more than 100 keys" in r.json()["detail"]
        r = h.post("/lookup", json={"keys": ["00" * 16] * 101}, headers=TOK)
        assert r.status_code == 422
        assert h.post(
            "/lookup", json={"token_ids": list(range(100)), "chunk_tokens": 1}, headers=TOK
        ).is_success
    assert called == [1]  # only the lookup within the bound was hashed
