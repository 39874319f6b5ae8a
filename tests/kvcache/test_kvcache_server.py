from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import httpx
import pytest

from pdmesh.kvcache.client import TierClient, TierError, TierUnavailable
from pdmesh.kvcache.keys import InputIdentity, ModelFingerprint, chunk_keys
from pdmesh.procs import free_port

from .conftest import tier_config

FP = ModelFingerprint("tiny", "r0", "float32", "cpu", 32)
SLOT = 65536
TOK = {"X-PDMesh-Token": "tier-token"}


def data_for(key: bytes, n: int = 40000) -> bytes:
    return (key * (n // 16 + 1))[:n]


def client(t, **kw) -> TierClient:
    return TierClient(t.config.socket_path, "tier-token", timeout_s=5, fingerprint=FP.to_dict(), **kw)


def test_control_api_roundtrip_and_cleanup(tmp_path, tier_factory):
    t = tier_factory(tier_config(tmp_path))
    with pytest.raises(TierError) as ei:
        TierClient(t.config.socket_path, "wrong").stats()
    assert ei.value.kind == "unauthorized"

    c = client(t)
    keys = chunk_keys(FP, list(range(32 * 6)), 32)
    chunks = [data_for(key) for key in keys]
    assert c.put(keys[:4], chunks[:4]) == 4
    assert c.lookup(keys).n == 4 and c.lookup(keys).tiers == ["memory"] * 4
    assert c.get(keys) == chunks[:4]

    # alloc -> write into shared memory -> commit; abort; duplicates
    r = c.alloc(keys[3:6], 1000)
    assert r.locs[0] is None and not r.full
    seg = c.segment()
    seg[r.locs[1].offset : r.locs[1].offset + 1000] = b"a" * 1000
    assert c.commit([keys[4]]) == 1 and c.abort([keys[5]]) == 1
    assert c.lookup(keys).n == 5

    # pins and in-use refs are held by the connection and undone when it goes away
    c2 = client(t)
    assert c2.pin(keys[:3]) == 3
    assert len(c2.load(keys[:2])) == 2
    assert c2.alloc([keys[5]], 100).locs[0] is not None  # never committed
    st = c.stats()["memory"]
    assert st["pinned"] == 3 and st["in_use"] == 2 and st["in_flight"] == 1
    c2.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        st = c.stats()["memory"]
        if st["pinned"] == st["in_use"] == st["in_flight"] == 0:
            break
        time.sleep(0.02)
    assert (st["pinned"], st["in_use"], st["in_flight"]) == (0, 0, 0)
    assert t.server.pool.holds() == (0, 0)
    c.close()


def test_leased_alloc_is_reclaimed_after_expiry(tmp_path, tier_factory):
    t = tier_factory(tier_config(tmp_path))
    c = client(t)
    key = b"L" * 16
    assert c.alloc([key], 100, lease_s=0.1).locs[0] is not None
    c.close()  # a leased allocation survives its connection ...
    c = client(t)
    assert c.stats()["memory"]["in_flight"] == 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and c.stats()["memory"]["in_flight"]:
        time.sleep(0.05)
    st = c.stats()["memory"]  # ... until lease + grace have passed
    assert st["in_flight"] == 0 and st["expired_leases"] == 1
    c.close()


def test_http_api(tmp_path, tier_factory):
    t = tier_factory(tier_config(tmp_path, fingerprint=FP.to_dict(), chunk_tokens=32))
    c = client(t)
    toks = list(range(32 * 3 + 5))
    keys = chunk_keys(FP, toks, 32)
    c.put(keys[:2], [data_for(k) for k in keys[:2]])
    with httpx.Client(base_url=t.http, timeout=5) as h:
        assert h.get("/health").json()["status"] == "ok"
        assert h.get("/stats").status_code == 401
        assert h.post("/lookup", json={"token_ids": toks}).status_code == 401
        r = h.post("/lookup", json={"token_ids": toks}, headers=TOK).json()
        assert r == {"chunks": 2, "tokens": 64, "total_chunks": 3, "tiers": ["memory", "memory"]}
        r = h.post("/lookup", json={"keys": [k.hex() for k in keys]}, headers=TOK).json()
        assert r["chunks"] == 2
        other = ModelFingerprint("tiny", "r1", "float32", "cpu", 32).to_dict()
        r = h.post("/lookup", json={"token_ids": toks, "fingerprint": other}, headers=TOK).json()
        assert r["chunks"] == 0
        assert h.post("/lookup", json={"keys": ["zz"]}, headers=TOK).status_code == 422
        # a tenant's salt keys its chunks: the plain prompt's chunks are not its hits, its own are
        salted = chunk_keys(FP, toks, 32, InputIdentity(salt="tenant-a"))
        assert (
            h.post("/lookup", json={"token_ids": toks, "salt": "tenant-a"}, headers=TOK).json()["chunks"] == 0
        )
        c.put(salted[:3], [data_for(k) for k in salted[:3]])
        assert (
            h.post("/lookup", json={"token_ids": toks, "salt": "tenant-a"}, headers=TOK).json()["chunks"] == 3
        )
        assert (
            h.post("/lookup", json={"token_ids": toks, "salt": "tenant-b"}, headers=TOK).json()["chunks"] == 0
        )
        assert h.post("/lookup", json={"token_ids": toks, "salt": 7}, headers=TOK).status_code == 422
        stats = h.get("/stats", headers=TOK).json()
        assert stats["memory"]["ready"] == 5
        metrics = h.get("/metrics").text
        for fam in ("pdmesh_tier_hits_total", "pdmesh_tier_evictions_total", "pdmesh_tier_used_bytes"):
            assert fam in metrics
        assert h.post("/clear", json={"tiers": ["memory"]}, headers=TOK).json()["cleared"]["memory"] == 5
    assert c.lookup(keys).n == 0
    c.close()


def test_http_lookup_by_token_ids_of_a_sharded_engine_counts_whole_chunks(tmp_path, tier_factory):
    """A TP=2 engine's tier holds each chunk as two parts (one per rank): /lookup by token ids (the router's
    cache-aware routing) counts a chunk when both parts are there; a fingerprint with bad sizes, or a lookup of too
    many keys, is refused with a 422."""
    from pdmesh.kvcache.keys import shard_keys

    tp2 = ModelFingerprint("tiny", "r1", "float32", "cpu", 32, 0, 2)
    t = tier_factory(tier_config(tmp_path, fingerprint=tp2.to_dict(), chunk_tokens=32))
    c = client(t)
    toks = list(range(32 * 4))
    keys = chunk_keys(tp2, toks, 32)
    held = shard_keys(keys[:3], 0, 2) + shard_keys(keys[:2], 1, 2)  # rank 1 lacks chunk 2's part
    c.put(held, [data_for(k) for k in held])
    with httpx.Client(base_url=t.http, timeout=5) as h:
        r = h.post("/lookup", json={"token_ids": toks}, headers=TOK).json()
        assert (r["chunks"], r["tokens"], r["total_chunks"]) == (2, 64, 4)
        assert r["tiers"] == ["memory", "memory"]  # one per whole chunk
        for bad in (1 << 20, "two", 2.0, True, 0, -2):  # absurd work or not sizes: 422, never a 500
            body = {"token_ids": toks, "fingerprint": {**tp2.to_dict(), "tp_size": bad}}
            assert h.post("/lookup", json=body, headers=TOK).status_code == 422, bad
        many = {"token_ids": list(range(40000)), "chunk_tokens": 1}  # 40000 chunks x 32 shards > the bound
        many["fingerprint"] = {**tp2.to_dict(), "tp_size": 32}
        assert h.post("/lookup", json=many, headers=TOK).status_code == 422
    c.close()


def test_http_stats_with_a_transfer_endpoint(tmp_path, tier_factory):
    t = tier_factory(tier_config(tmp_path, transfer={"enabled": True}))
    with httpx.Client(base_url=t.http, timeout=5) as h:
        stats = h.get("/stats", headers=TOK)
        assert stats.status_code == 200, stats.text
        assert stats.json()["transfer"]["push"]["pushes"] == 0


def test_http_api_authenticates_before_reading_and_bounds_bodies(tmp_path, tier_factory):
    """An unauthenticated client costs a header parse: 401 without the body being read; bodies are bounded."""
    from pdmesh.kvcache.tier_http import MAX_BODY_BYTES

    t = tier_factory(tier_config(tmp_path, fingerprint=FP.to_dict(), chunk_tokens=32))
    big = b'{"keys": ["' + b"0" * (MAX_BODY_BYTES + 10) + b'"]}'
    with httpx.Client(base_url=t.http, timeout=10) as h:
        r = h.post("/lookup", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 401
        assert h.post("/lookup", content=big, headers=TOK).status_code == 413

        def chunks():  # no Content-Length: the limit holds while reading too
            for _ in range(MAX_BODY_BYTES // 65536 + 2):
                yield b"0" * 65536

        assert h.post("/lookup", content=chunks(), headers=TOK).status_code == 413
        assert h.post("/lookup", content=b"\xff{", headers=TOK).status_code == 400
        assert h.post("/lookup", content=b"[1]", headers=TOK).status_code == 400
        assert h.post("/lookup", json={"token_ids": [1], "chunk_tokens": -5}, headers=TOK).status_code == 422
        assert h.post("/clear", json={"tiers": "memory"}, headers=TOK).status_code == 422
        assert h.get("/health").status_code == 200  # still serving


def test_eviction_spills_to_disk_and_loads_back(tmp_path, tier_factory):
    cfg = tier_config(tmp_path, pool_bytes=4 * SLOT, disk__enabled=True, disk__path=str(tmp_path / "disk"))
    t = tier_factory(cfg)
    c = client(t)
    keys = chunk_keys(FP, list(range(32 * 10)), 32)
    for key in keys:
        assert c.put([key], [data_for(key)]) == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and c.stats()["disk"]["files"] < 6:
        time.sleep(0.05)
    assert c.stats()["disk"]["files"] == 6
    res = c.lookup(keys)
    assert res.n == 10 and res.tiers == ["disk"] * 6 + ["memory"] * 4
    got = c.get(keys[:3])  # read from disk straight into pool slots
    assert got == [data_for(k) for k in keys[:3]]
    assert c.stats()["counters"]["disk"]["hits"] == 3
    assert t.server.pool.holds() == (0, 0)
    c.close()


@pytest.mark.parametrize("kind", ["pdmesh", pytest.param("redis", marks=pytest.mark.redis)])
def test_remote_write_through_and_load(tmp_path, tier_factory, kind, request):
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        cs = request.getfixturevalue("cache_server")
        url = f"pdmesh://127.0.0.1:{cs.port}"
    a = tier_factory(tier_config(tmp_path / "a", remote__url=url, token="cs-token"))
    b = tier_factory(tier_config(tmp_path / "b", remote__url=url, token="cs-token"))
    ca = TierClient(a.config.socket_path, "cs-token", timeout_s=5, fingerprint=FP.to_dict())
    cb = TierClient(b.config.socket_path, "cs-token", timeout_s=5, fingerprint=FP.to_dict())
    keys = chunk_keys(FP, list(range(1000, 1000 + 32 * 4)), 32)
    ca.put(keys, [data_for(k) for k in keys])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and cb.lookup(keys).n < 4:
        time.sleep(0.05)
    res = cb.lookup(keys)
    assert res.n == 4 and res.tiers == ["remote"] * 4
    assert cb.get(keys) == [data_for(k) for k in keys]  # remote -> b's pool, byte-exact
    assert cb.lookup(keys).tiers == ["memory"] * 4
    ca.close()
    cb.close()


def test_dead_remote_misses_fast_and_server_survives(tmp_path, tier_factory):
    url = f"pdmesh://127.0.0.1:{free_port()}"
    t = tier_factory(
        tier_config(tmp_path, remote__url=url, remote__timeout_s=0.3, remote__connect_timeout_s=0.2)
    )
    c = client(t)
    keys = chunk_keys(FP, list(range(32 * 3)), 32)
    c.put(keys[:1], [data_for(keys[0])])
    for _ in range(5):
        res = c.lookup(keys)  # bounded by the remote timeouts, then by the open breaker
        assert res.n == 1
        assert len(c.load(keys)) == 1
        c.release(keys[:1])
    st = c.stats()
    assert st["remote"]["up"] is False and st["remote"]["errors"] >= 1
    with httpx.Client(base_url=t.http, timeout=5) as h:
        assert h.get("/health").json()["remote_up"] is False
    c.close()


def test_client_raises_tier_unavailable_when_server_is_down(tmp_path):
    c = TierClient(str(tmp_path / "nobody.sock"), timeout_s=0.5)
    with pytest.raises(TierUnavailable):
        c.lookup([b"k" * 16])
    c.close()


def test_client_raises_tier_unavailable_after_server_stops(tmp_path, tier_factory):
    t = tier_factory(tier_config(tmp_path))
    c = client(t)
    assert c.lookup([b"k" * 16]).n == 0
    t.stop()
    with pytest.raises(TierUnavailable):
        c.lookup([b"k" * 16])
    c.close()


def test_client_reaches_a_restarted_server_on_its_first_call(tmp_path, tier_factory):
    """The server restarted on the same socket: the client's open connection is dead; the next call goes through
    on a fresh connection instead of failing once (which would open the connector's lookup breaker and lose the
    hits of the next second)."""
    cfg = tier_config(tmp_path)
    t = tier_factory(cfg)
    c = client(t)
    assert c.lookup([b"k" * 16]).n == 0
    t.stop()
    tier_factory(cfg)
    assert c.lookup([b"k" * 16]).n == 0
    c.close()


def test_control_socket_bounds_what_it_does_before_the_hello(tmp_path, tier_factory, monkeypatch):
    """A connection that sends nothing is closed after the hello timeout; an oversized first frame at once; a
    correct client is served meanwhile."""
    import socket

    from pdmesh.kvcache import control_ops

    monkeypatch.setattr(control_ops, "HELLO_TIMEOUT_S", 0.5)
    t = tier_factory(tier_config(tmp_path))
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(t.config.socket_path)
    silent.settimeout(10)
    t0 = time.monotonic()
    assert silent.recv(1) == b""  # closed by the server
    assert time.monotonic() - t0 < 5
    big = socket.socket(socket.AF_UNIX)
    big.connect(t.config.socket_path)
    big.settimeout(10)
    big.sendall((1 << 20).to_bytes(4, "big") + b"x" * 64)  # a 1 MiB "hello"
    t0 = time.monotonic()
    assert big.recv(1) == b""
    assert time.monotonic() - t0 < 0.4  # refused at the length, not after the timeout
    c = client(t)
    assert c.lookup([b"k" * 16]).n == 0
    c.close()
    silent.close()
    big.close()


def test_kill9_tier_server_during_disk_writes(tmp_path, tier_process):
    """SIGKILL the tier server while it writes chunks to disk; after a restart the index is rebuilt from disk and
    every chunk it serves is byte-exact (no torn or corrupt chunk is ever served)."""
    disk = tmp_path / "disk"
    env = {
        "PDMESH_TIER_DISK_ENABLED": "true",
        "PDMESH_TIER_DISK_PATH": str(disk),
        "PDMESH_TIER_DISK_WRITE_THROUGH": "true",
        "PDMESH_TIER_POOL_BYTES": "4MiB",
        "PDMESH_TIER_SLOT_BYTES": "256KiB",
        "PDMESH_CLUSTER_TOKEN": "kt",
    }
    sock = str(tmp_path / "t.sock")
    args = ["--socket", sock, "--http-port", "0"]
    p = tier_process(args, env)
    keys = chunk_keys(FP, list(range(32 * 400)), 32)
    stop = threading.Event()

    def writer():
        c = TierClient(sock, "kt", timeout_s=2, fingerprint=FP.to_dict())
        try:
            for key in keys:
                if stop.is_set():
                    return
                c.put([key], [data_for(key, 200_000)])
        except (TierUnavailable, TierError):
            pass
        finally:
            c.close()

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(list((disk / "v1").glob("*/*.kv"))) < 10:
        time.sleep(0.02)
    p.kill()  # SIGKILL mid-stream: writes are in flight
    stop.set()
    th.join(10)
    files_before = len(list((disk / "v1").glob("*/*.kv")))
    assert files_before >= 10
    # a torn file planted by hand is detected at restart too
    victim = next((disk / "v1").glob("*/*.kv"))
    victim.write_bytes(victim.read_bytes()[:1000])

    p2 = tier_process(args, env)
    c = TierClient(sock, "kt", timeout_s=5, fingerprint=FP.to_dict())
    st = c.stats()["disk"]
    assert st["files"] == files_before - 1 and st["corrupt"] == 1
    res = c.lookup(keys, remote=False)
    present = [k for k, tier in zip(keys, res.tiers, strict=False) if tier == "disk"]
    served = 0
    for key in keys[: res.n]:
        got = c.get([key])
        if got:
            assert got[0] == data_for(key, 200_000)
            served += 1
    assert served == res.n and len(present) == res.n
    assert c.stats()["disk"]["corrupt"] == 1
    c.close()
    p2.kill()
    assert os.path.exists(disk / "v1")


def test_load_waits_for_a_chunk_still_being_written(tmp_path, tier_factory):
    """A chunk in flight (e.g. a PD push landing) is waited for, not reported missing: missing means recompute."""
    t = tier_factory(tier_config(tmp_path, inflight_wait_s=4.0))
    writer, reader = client(t), client(t)

    def load_in_thread(key: bytes) -> tuple[threading.Thread, dict]:
        result: dict = {}
        th = threading.Thread(target=lambda: result.setdefault("locs", reader.load([key])))
        th.start()
        return th, result

    key = b"w" * 16
    loc = writer.alloc([key], 1000).locs[0]
    assert loc is not None
    th, result = load_in_thread(key)
    time.sleep(0.1)
    writer.segment()[loc.offset : loc.offset + 1000] = b"z" * 1000
    writer.commit([key])
    th.join(10)
    (got,) = result["locs"]
    assert bytes(reader.segment()[got.offset : got.offset + got.length]) == b"z" * 1000
    reader.release([key])

    # an allocation that is aborted ends the wait with a miss
    k2 = b"v" * 16
    assert writer.alloc([k2], 1000).locs[0] is not None
    th, result = load_in_thread(k2)
    time.sleep(0.1)
    writer.abort([k2])
    th.join(10)
    assert result["locs"] == []


class _BadRemote:
    """A remote tier whose reads fail in ways the tier does not expect, or hang until released."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.release = threading.Event()
        self.started = threading.Event()
        self.finished = threading.Event()

    def get_into(self, key, out, fingerprint=None):
        self.started.set()
        if self.error is not None:
            raise self.error
        self.release.wait(10)
        out[:4] = b"late"  # a slow read writes into the slot after its caller gave up
        self.finished.set()
        return None


def test_a_fill_that_fails_in_any_way_releases_its_slot(tmp_path, tier_factory):
    """No key stays allocated after a failed cache fill (later requests for the chunk would wait on it for the
    full in-flight wait): an unexpected error is a miss, and a cancelled fill aborts once its reader is done."""
    t = tier_factory(tier_config(tmp_path))
    tier = t.server
    for i, error in enumerate([RuntimeError("driver bug"), KeyError("x"), ValueError("bad record")]):
        key = bytes([i]) * 16
        tier.remote = _BadRemote(error)
        assert t.run(lambda key=key: tier._fill_from("remote", key, None)) is False
        assert tier.pool.meta(key) is None, error
    key = b"\x09" * 16
    slow = tier.remote = _BadRemote()

    async def cancelled_fill():
        task = asyncio.ensure_future(tier._fill_from("remote", key, None))
        assert await asyncio.to_thread(slow.started.wait, 5)
        task.cancel()
        await asyncio.sleep(0.05)
        held_while_reading = tier.pool.meta(key) is not None  # the reader still writes into the slot
        slow.release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return held_while_reading

    assert t.run(cancelled_fill) is True
    assert slow.finished.is_set() and tier.pool.meta(key) is None
    tier.remote = None
