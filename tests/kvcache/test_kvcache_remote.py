from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdmesh.kvcache.remote import (
    CacheServerClient,
    CircuitBreaker,
    GuardedRemote,
    RedisTier,
    RemoteError,
    RemoteUnavailable,
    open_remote,
    remote_breaker,
)
from pdmesh.procs import free_port

CHUNK = 256 * 1024


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def chunk(i: int, n: int = CHUNK) -> bytes:
    return (i.to_bytes(8, "little") * (n // 8 + 1))[:n]


def _concurrent_roundtrip(make_client, writers: int = 8, readers: int = 8, per_writer: int = 6):
    """8 writers put distinct chunks while 8 readers read them back; every hit must be byte-exact."""
    clients = [make_client() for _ in range(writers + readers)]
    done = threading.Event()
    bad: list[str] = []
    hits = [0]

    def write(w: int):
        for j in range(per_writer):
            i = w * 100 + j
            clients[w].put(k(i), chunk(i), b"F" * 16)

    def read(r: int):
        buf = bytearray(CHUNK)
        c = clients[writers + r]
        deadline = time.monotonic() + 20
        while not done.is_set() and time.monotonic() < deadline:
            for w in range(writers):
                for j in range(per_writer):
                    i = w * 100 + j
                    n = c.get_into(k(i), buf, b"F" * 16)
                    if n is not None:
                        hits[0] += 1
                        if n != CHUNK or buf != chunk(i):
                            bad.append(f"chunk {i} differs")
            time.sleep(0.001)

    with ThreadPoolExecutor(writers + readers) as ex:
        rfs = [ex.submit(read, r) for r in range(readers)]
        for f in [ex.submit(write, w) for w in range(writers)]:
            f.result(30)
        done.set()
        for f in rfs:
            f.result(30)
    assert not bad
    check = clients[0]
    buf = bytearray(CHUNK)
    for w in range(writers):
        for j in range(per_writer):
            i = w * 100 + j
            assert check.get_into(k(i), buf, b"F" * 16) == CHUNK and buf == chunk(i)
    assert check.get_into(k(0), buf, b"G" * 16) is None  # another fingerprint never sees it
    for c in clients:
        c.close()


def test_cache_server_concurrent_roundtrip(cache_server):
    host, port = cache_server.address
    _concurrent_roundtrip(lambda: CacheServerClient(host, port, "cs-token"))
    assert cache_server.stats().items == 48


def test_cache_server_lru_bound_auth_and_contains(cache_server):
    from pdmesh.kvcache.cache_server import CacheServer

    small = CacheServer("127.0.0.1", 0, max_bytes=3 * 4096, token="t")
    small.start()
    try:
        c = CacheServerClient(*small.address, "t")
        for i in range(5):
            assert c.put(k(i), chunk(i, 1000))
        assert c.contains([k(2), k(3), k(4)]) == 3 and c.contains([k(0), k(4)]) == 0
        st = c.stats()
        assert st["items"] == 3 and st["used_bytes"] == 3 * 4096 and st["evictions"] == 2
        assert st["buffer_bytes"] == 3 * 4096
        assert c.get(k(4)) == chunk(4, 1000)
        assert c.delete([k(4)]) == 1 and c.get(k(4)) is None
        assert c.clear() == 2
        with pytest.raises(RemoteError):
            CacheServerClient(*small.address, "wrong").contains([k(1)])
        c.close()
    finally:
        small.close()


def test_cache_server_rejects_bad_checksum(cache_server):
    from pdmesh.frames import recv_frame, send_frame

    s = socket.create_connection(cache_server.address, timeout=5)
    send_frame(s, {"op": "hello", "proto": 1, "token": "cs-token"})
    assert recv_frame(s)["ok"]
    put = {"op": "put", "key": k(1), "fp": b"F" * 16, "n": 10, "csum": 12345, "mac": b"m" * 16}
    send_frame(s, put, b"0123456789")
    reply = recv_frame(s)
    assert reply["ok"] is False and reply["error"] == "corrupt"
    send_frame(s, {"op": "get", "key": k(1)})
    assert recv_frame(s)["hit"] is False
    s.close()


def test_cache_server_survives_malformed_requests_and_bounds_pre_auth(cache_server):
    """Wrong types from the wire get an error reply; unauthenticated peers get a small frame and a few seconds."""
    from pdmesh.frames import recv_frame, send_frame
    from pdmesh.kvcache.cache_server import HELLO_TIMEOUT_S, PRE_AUTH_MAX_FRAME

    for bad_token in (5, ["cs-token"], None, b"cs-token"):
        s = socket.create_connection(cache_server.address, timeout=5)
        send_frame(s, {"op": "hello", "proto": 1, "token": bad_token})
        assert recv_frame(s)["error"] == "unauthorized"
        s.close()
    s = socket.create_connection(cache_server.address, timeout=5)
    send_frame(s, {"op": "hello", "proto": 1, "token": "cs-token"})
    assert recv_frame(s)["ok"]
    for bad in (
        {"op": "get", "key": [1, 2]},
        {"op": "get", "key": k(1), "fp": 7},
        {"op": "contains", "keys": 5},
        {"op": "contains", "keys": [1, 2]},
        {"op": "delete", "keys": "x"},
    ):
        send_frame(s, bad)
        reply = recv_frame(s)
        assert reply["ok"] is False and reply["error"] == "bad_request", bad
    send_frame(s, {"op": "contains", "keys": [k(1)]})
    assert recv_frame(s) == {"ok": True, "n": 0}  # the same connection still serves
    s.close()
    big = socket.create_connection(cache_server.address, timeout=HELLO_TIMEOUT_S + 5)
    big.sendall((PRE_AUTH_MAX_FRAME + 1).to_bytes(4, "big"))
    assert big.recv(1) == b""  # closed without reading a body it would have to buffer
    big.close()
    idle = socket.create_connection(cache_server.address, timeout=HELLO_TIMEOUT_S + 5)
    t0 = time.monotonic()
    assert idle.recv(1) == b""  # a silent peer is dropped at the hello deadline, not after the idle timeout
    assert time.monotonic() - t0 < HELLO_TIMEOUT_S + 2
    idle.close()


@pytest.mark.redis
def test_redis_concurrent_roundtrip(redis_url):
    _concurrent_roundtrip(lambda: RedisTier(redis_url))
    r = RedisTier(redis_url)
    assert r.contains([k(0), k(1), k(999)]) == 2
    # a corrupted value is detected, dropped and never served
    raw = bytearray(r._r.get(r._k(k(0))))
    raw[-1] ^= 0xFF
    r._r.set(r._k(k(0)), bytes(raw))
    assert r.get(k(0)) is None and r.mac_failures == 1 and r.contains([k(0)]) == 0
    r._r.set(r._k(k(1)), b"PDKV")  # a malformed value: corrupt, not a tag failure
    assert r.get(k(1)) is None and r.corrupt == 1 and r.contains([k(1)]) == 0
    assert r.clear() >= 46
    r.close()


def _dead_port_url(scheme: str) -> str:
    return f"{scheme}://127.0.0.1:{free_port()}" + ("/0" if scheme == "redis" else "")


@pytest.mark.parametrize("scheme", ["pdmesh", "redis"])
def test_down_remote_misses_fast_and_breaker_opens(scheme):
    tier = open_remote(_dead_port_url(scheme), timeout_s=0.5, connect_timeout_s=0.2)
    with pytest.raises(RemoteUnavailable):
        tier.contains([k(1)])
    g = GuardedRemote(
        tier, remote_breaker(failures=2, cooldown_s=60), remote_breaker(failures=2, cooldown_s=60)
    )
    buf = bytearray(16)
    for _ in range(10):
        assert g.get_into(k(1), buf) is None
        assert g.contains([k(1)]) == 0
        assert g.put(k(1), b"x") is False
    # reads and writes have a breaker each: two errors open each one, everything after is short-circuited
    assert g.stats.errors == 4 and g.stats.short_circuited == 26 and not g.available and not g.writable
    g.close()


def test_blackholed_remote_is_bounded_by_timeout():
    """A server that accepts but never answers: the call ends by timeout, never hangs."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    try:
        c = CacheServerClient("127.0.0.1", lsock.getsockname()[1], timeout_s=0.3, connect_timeout_s=0.3)
        with pytest.raises(RemoteUnavailable):
            c.contains([k(1)])
        c.close()
    finally:
        lsock.close()


def test_breaker_half_open_recovers():
    now = [0.0]
    b = CircuitBreaker(failures=1, open_s=5, max_open_s=5, clock=lambda: now[0])
    b.record_failure()
    assert not b.try_acquire() and b.is_open
    now[0] = 6
    assert b.try_acquire()  # one trial
    assert not b.try_acquire()
    b.record_success()
    assert b.try_acquire() and not b.is_open


def test_open_remote_rejects_unknown_scheme():
    with pytest.raises(ValueError):
        open_remote("http://x:1")
    with pytest.raises(ValueError):
        open_remote("pdmesh://hostonly")
    assert os  # keep import used for readability of helpers


def test_cache_server_recycles_buffers_safely_under_eviction():
    """A store much smaller than the data: buffers are recycled while readers send them; every hit stays exact."""
    from pdmesh.kvcache.cache_server import CacheServer

    small = CacheServer("127.0.0.1", 0, max_bytes=6 * CHUNK, token="")
    small.start()
    try:
        _concurrent_roundtrip_lossy(lambda: CacheServerClient(*small.address))
        st = small.stats()
        assert st.evictions > 0 and st.buffer_bytes <= 6 * CHUNK
    finally:
        small.close()


def _concurrent_roundtrip_lossy(make_client, writers: int = 4, readers: int = 4, per_writer: int = 8):
    clients = [make_client() for _ in range(writers + readers)]
    bad: list[str] = []
    done = threading.Event()

    def write(w):
        for j in range(per_writer):
            clients[w].put(k(w * 100 + j), chunk(w * 100 + j))

    def read(r):
        buf = bytearray(CHUNK)
        deadline = time.monotonic() + 20
        while not done.is_set() and time.monotonic() < deadline:
            for i in [w * 100 + j for w in range(writers) for j in range(per_writer)]:
                n = clients[writers + r].get_into(k(i), buf)
                if n is not None and (n != CHUNK or buf != chunk(i)):
                    bad.append(str(i))

    with ThreadPoolExecutor(writers + readers) as ex:
        rfs = [ex.submit(read, r) for r in range(readers)]
        for f in [ex.submit(write, w) for w in range(writers)]:
            f.result(30)
        done.set()
        for f in rfs:
            f.result(30)
    assert not bad
    for c in clients:
        c.close()


def test_client_serves_the_first_call_after_a_cache_server_restart():
    """Pooled sockets to a restarted server are all stale: the first failure drops them and retries once on a
    fresh connection, so service is back on the next call (not one dead socket per call behind a breaker)."""
    from pdmesh.kvcache.cache_server import CacheServer

    first = CacheServer("127.0.0.1", 0, max_bytes=64 << 20, token="t")
    first.start()
    port = first.port
    c = CacheServerClient("127.0.0.1", port, "t", timeout_s=2, connect_timeout_s=0.5, max_idle=8)
    g = GuardedRemote(c)
    with ThreadPoolExecutor(8) as ex:  # fill the pool with several idle connections
        assert all(ex.map(lambda i: g.put(k(i), chunk(i, 4096)), range(16)))
    assert c._idle.qsize() > 1
    first.close()
    second = CacheServer("127.0.0.1", port, max_bytes=64 << 20, token="t")
    second.start()
    try:
        t0 = time.monotonic()
        assert g.put(k(99), chunk(99, 4096)) is True  # the very next call succeeds
        assert time.monotonic() - t0 < 1.0
        assert g.contains([k(99)]) == 1 and g.stats.errors == 0
    finally:
        c.close()
        second.close()


@pytest.mark.redis
def test_a_full_redis_still_serves_reads(redis_url):
    """Redis at maxmemory with noeviction refuses writes (OOM): the write breaker opens, reads go on hitting."""
    import redis

    admin = redis.Redis.from_url(redis_url)
    admin.flushdb()
    tier = open_remote(redis_url, timeout_s=2, connect_timeout_s=0.5, ttl_s=600)
    g = GuardedRemote(tier)
    try:
        assert g.put(k(1), chunk(1, 64 << 10)) is True
        assert 0 < admin.ttl(tier._k(k(1))) <= 600  # ttl_s reaches Redis
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", used + (256 << 10))
        results = [g.put(k(i), chunk(i, 64 << 10)) for i in range(2, 40)]
        assert not all(results)  # Redis filled up and refused
        assert not g.writable and g.available  # only the write breaker opened
        buf = bytearray(64 << 10)
        assert g.get_into(k(1), buf) == 64 << 10 and bytes(buf) == chunk(1, 64 << 10)
        assert g.contains([k(1)]) == 1
    finally:
        admin.config_set("maxmemory", 0)
        admin.flushdb()
        g.close()
        admin.close()


# ---------------------------------------------------------------------- record tags (remote tier integrity)
FP_A = b"F" * 16
SECRET = "cluster-secret"


def _redis_tier(redis_url: str, token: str) -> RedisTier:
    return RedisTier(redis_url, token, prefix="pdmesh:mactest:")


def test_record_mac_binds_key_fingerprint_payload_and_token():
    from pdmesh.kvcache.record import (
        HEADER_BYTES,
        CorruptRecord,
        FingerprintMismatch,
        RecordHeader,
        RecordMac,
        UnauthenticRecord,
    )

    mac, data = RecordMac(SECRET), chunk(1, 4096)
    rec = mac.seal(k(1), data, FP_A) + data
    assert len(mac.seal(k(1), data, FP_A)) == HEADER_BYTES
    assert bytes(mac.open(rec, k(1), FP_A)) == data and bytes(mac.open(rec, k(1))) == data
    assert mac.verify(mac.tag(k(1), FP_A, data), k(1), FP_A, data)
    assert mac.keyed and not RecordMac("").keyed

    def fails(raw, exc=UnauthenticRecord, key=k(1), fp=FP_A, m=mac):
        with pytest.raises(exc):
            m.open(raw, key, fp)

    fails(rec, key=k(2))  # a genuine record moved to another key
    fails(RecordMac("other-cluster").seal(k(1), data, FP_A) + data)  # another token
    fails(RecordMac("").seal(k(1), data, FP_A) + data)  # written without a token
    fails(rec, m=RecordMac(""))  # and the other way round
    tampered = bytearray(rec)
    tampered[HEADER_BYTES + 100] ^= 1
    fails(bytes(tampered))
    relabelled = bytearray(rec)
    relabelled[24:40] = (
        b"G" * 16
    )  # the fingerprint field: a forged fingerprint is unauthentic, not a plain miss
    fails(bytes(relabelled), fp=b"G" * 16)
    fails(RecordHeader.for_payload(k(1), data, FP_A).pack() + data)  # version 1 carries no tag
    fails(rec[:-1], exc=CorruptRecord)  # length mismatch
    fails(b"XXXX" + rec[4:], exc=CorruptRecord)
    fails(rec[:10], exc=CorruptRecord)
    fails(rec, exc=FingerprintMismatch, fp=b"G" * 16)  # a genuine record of another model
    assert not mac.verify(None, k(1), FP_A, data) and not mac.verify(b"short", k(1), FP_A, data)
    assert not mac.verify(mac.tag(k(1), FP_A, data), k(1), 7, data)


@pytest.mark.redis
def test_redis_rejects_planted_and_tampered_records(redis_url):
    """A writer without the cluster secret cannot make a reader accept a chunk: planted values (a valid-looking
    header with a wrong tag, another token's record, an old-version record, a record moved from another key) and a
    tampered payload are misses, counted in ``mac_failures`` and deleted; the genuine put then goes through."""
    import redis

    from pdmesh.kvcache.record import HEADER_BYTES, RecordHeader, RecordMac

    r = _redis_tier(redis_url, SECRET)
    r.clear()
    raw = redis.Redis.from_url(redis_url)  # the other writer: plain access to the database, no secret
    data = chunk(7, 8192)
    buf = bytearray(len(data))

    good_head = RecordMac(SECRET).seal(k(1), data, FP_A)
    planted = {
        k(1): good_head[:-16] + b"\0" * 16 + data,  # right layout, wrong tag
        k(2): RecordMac("not-the-secret").seal(k(2), data, FP_A) + data,
        k(3): RecordMac("").seal(k(3), data, FP_A) + data,  # an unkeyed digest anyone can compute
        k(4): RecordHeader.for_payload(k(4), data, FP_A).pack() + data,  # record version 1 (old tiers)
        k(5): good_head + data,  # a genuine record of k(1) copied under k(5)
    }
    for key, value in planted.items():
        raw.set(r._k(key), value)
    assert r.contains(list(planted)) == len(planted)  # present, but never served:
    for n, key in enumerate(planted, 1):
        assert r.get_into(key, buf, FP_A) is None
        assert r.mac_failures == n and r.corrupt == 0
        assert not raw.exists(r._k(key))  # deleted: it cannot block the genuine SET NX
    assert r.put(k(1), data, FP_A) is True
    assert r.get_into(k(1), buf, FP_A) == len(data) and buf == data

    # a genuine record with its payload altered in place
    value = bytearray(raw.get(r._k(k(1))))
    value[HEADER_BYTES + 5] ^= 0x40
    raw.set(r._k(k(1)), bytes(value))
    g = GuardedRemote(r)
    assert g.get_into(k(1), buf, FP_A) is None  # a miss, never an exception
    assert r.mac_failures == len(planted) + 1 and g.mac_failures == r.mac_failures
    assert g.stats.misses == 1 and g.stats.errors == 0
    r.clear()
    r.close()
    raw.close()


@pytest.mark.redis
def test_redis_records_read_only_under_the_same_secret(redis_url):
    writer = _redis_tier(redis_url, SECRET)
    writer.clear()
    same = _redis_tier(redis_url, SECRET)
    data = chunk(3, 4096)
    buf = bytearray(len(data))
    for i in range(3):
        assert writer.put(k(i), data, FP_A)
    assert same.get_into(k(0), buf, FP_A) == len(data) and buf == data  # another node, same secret
    assert same.get(k(1)) == data and same.mac_failures == 0
    other = _redis_tier(redis_url, "another-cluster")
    assert other.get_into(k(0), buf, FP_A) is None and other.mac_failures == 1
    unkeyed = _redis_tier(redis_url, "")
    assert unkeyed.get(k(2)) is None and unkeyed.mac_failures == 1
    for t in (writer, same, other, unkeyed):
        t.close()


def _raw_cache_conn(address, token):
    from pdmesh.frames import recv_frame, send_frame
    from pdmesh.kvcache.cache_server import PROTO_VERSION

    s = socket.create_connection(address, timeout=5)
    send_frame(s, {"op": "hello", "proto": PROTO_VERSION, "token": token})
    assert recv_frame(s)["ok"]
    return s


def _raw_put(s, key, data, mac, fp=FP_A):
    from pdmesh.frames import recv_frame, send_frame
    from pdmesh.kvcache.record import checksum

    send_frame(
        s, {"op": "put", "key": key, "fp": fp, "n": len(data), "csum": checksum(data), "mac": mac}, data
    )
    return recv_frame(s)


def test_cache_server_rejects_planted_and_tampered_records():
    """The cache server stores tags opaquely and the client verifies them: a chunk put by a writer without the
    secret (a wrong tag, another token's tag, a good tag over another payload) or altered inside the server is a
    miss, counted and deleted; records read back only under the same secret."""
    from pdmesh.kvcache.cache_server import CacheServer
    from pdmesh.kvcache.record import RecordMac

    server = CacheServer(
        "127.0.0.1", 0, max_bytes=64 << 20, token=""
    )  # loopback, no hello token: anyone writes
    server.start()
    c = CacheServerClient(*server.address, SECRET)
    raw = _raw_cache_conn(server.address, "")
    data, other = chunk(5, 8192), chunk(6, 8192)
    buf = bytearray(len(data))
    try:
        good = RecordMac(SECRET).tag(k(3), FP_A, data)
        planted = {
            k(1): b"\0" * 16,
            k(2): RecordMac("not-the-secret").tag(k(2), FP_A, data),
            k(3): good,  # the genuine tag of `data`, over another payload
            k(4): good,  # ... and under another key
        }
        for key, mac in planted.items():
            assert _raw_put(raw, key, other if key == k(3) else data, mac)["stored"] is True
        for n, key in enumerate(planted, 1):
            assert c.get_into(key, buf, FP_A) is None
            assert c.mac_failures == n and c.corrupt == 0
            assert c.contains([key]) == 0  # deleted: the genuine put is not blocked
        assert c.put(k(1), data, FP_A) is True
        assert c.get_into(k(1), buf, FP_A) == len(data) and buf == data

        # a put without a tag is refused
        from pdmesh.frames import recv_frame, send_frame

        send_frame(raw, {"op": "put", "key": k(9), "fp": FP_A, "n": 4, "csum": 0}, b"abcd")
        assert recv_frame(raw)["error"] == "bad_request"

        # altered inside the server: the payload, the fingerprint
        assert c.put(k(2), data, FP_A) and c.put(k(3), data, FP_A)
        item = server.store._items[k(2)]
        item.buf[7] ^= 1
        item.csum = __import__("xxhash").xxh3_64_intdigest(
            item.data
        )  # a consistent checksum: only the tag tells
        server.store._items[k(3)].fp = b"G" * 16
        g = GuardedRemote(c)
        assert g.get_into(k(2), buf, FP_A) is None and c.mac_failures == len(planted) + 1
        assert g.get_into(k(3), buf, b"G" * 16) is None and c.mac_failures == len(planted) + 2
        assert g.stats.misses == 2 and g.stats.errors == 0

        # damage the checksum also sees is counted as corrupt
        assert c.put(k(4), data, FP_A)
        server.store._items[k(4)].buf[0] ^= 1
        assert c.get_into(k(4), buf, FP_A) is None and c.corrupt == 1

        # the same secret reads its records, another secret (or none) does not
        assert c.put(k(5), data, FP_A)
        same = CacheServerClient(*server.address, SECRET)
        assert same.get_into(k(5), buf, FP_A) == len(data) and buf == data
        other_cluster = CacheServerClient(*server.address, "another-cluster")
        assert other_cluster.get(k(5), FP_A) is None and other_cluster.mac_failures == 1
        for cl in (same, other_cluster):
            cl.close()
    finally:
        raw.close()
        c.close()
        server.close()


def test_tier_counts_remote_mac_failures_in_stats_and_metrics(tmp_path, tier_factory, cache_server):
    """A chunk planted in the remote (here straight into the cache server's store, as a compromised server would)
    is a miss for the tier's load, shown in /stats and as ``pdmesh_tier_remote_mac_failures_total``."""
    import httpx

    from pdmesh.kvcache.client import TierClient
    from pdmesh.kvcache.keys import ModelFingerprint, chunk_keys

    from .conftest import tier_config

    fp = ModelFingerprint("tiny", "r0", "float32", "cpu", 32)
    t = tier_factory(
        tier_config(tmp_path, remote__url=f"pdmesh://127.0.0.1:{cache_server.port}", token="cs-token")
    )
    c = TierClient(t.config.socket_path, "cs-token", timeout_s=5, fingerprint=fp.to_dict())
    keys = chunk_keys(fp, list(range(64)), 32)
    for key in keys:
        cache_server.store.put(key, chunk(1, 4096), fp.digest(), mac=b"\0" * 16)
    assert c.lookup(keys).tiers == ["remote"] * 2  # present in the remote...
    assert c.load(keys) == []  # ...but never loaded
    st = c.stats()
    assert st["remote"]["mac_failures"] == 1 and st["remote"]["corrupt"] == 0 and st["remote"]["errors"] == 0
    with httpx.Client(base_url=t.http, timeout=5) as h:
        assert "pdmesh_tier_remote_mac_failures_total 1.0" in h.get("/metrics").text
    c.close()
