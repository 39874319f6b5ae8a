from __future__ import annotations

import os

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pdmesh.kvcache.pool import ChunkPool, ChunkState, PoolFull
from pdmesh.kvcache.transfer_node import LeaseRegionProvider
from pdmesh.transfer.segment import attach_segment


@pytest.fixture
def pool():
    p = ChunkPool(1024, 4, lease_grace_s=0.0)
    yield p
    p.close()


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_states_and_lookup(pool):
    a = pool.alloc(k(1), 100)
    assert a is not None and a.length == 100 and a.offset % 1024 == 0
    assert pool.alloc(k(1), 100) is None  # in flight
    assert pool.lookup([k(1)]) == 0
    pool.buffer[a.offset : a.offset + 100] = b"x" * 100
    assert pool.mark_written(k(1))
    assert pool.lookup([k(1)]) == 0
    assert pool.commit(k(1))
    assert pool.lookup([k(1), k(2)]) == 1
    assert pool.get(k(1)) == b"x" * 100
    assert not pool.abort(k(1))  # ready chunks are not aborted
    with pytest.raises(ValueError):
        pool.alloc(k(3), 1025)


def test_lru_eviction_skips_pinned_and_in_use(pool):
    for i in range(4):
        assert pool.put(k(i), bytes([i]) * 10)
    pool.pin([k(0)])
    view = pool.acquire(k(1))
    pool.lookup([k(2)])  # k(3) is now the least recently used evictable... after k(2) touched
    pool.put(k(10), b"n" * 10)
    assert pool.locate(k(3)) is None  # evicted
    assert pool.locate(k(0)) and pool.locate(k(1)) and pool.locate(k(2))
    pool.put(k(11), b"m" * 10)
    assert pool.locate(k(2)) is None
    pool.pin([k(10), k(11)])
    with pytest.raises(PoolFull):
        pool.put(k(12), b"z")  # k0, k10, k11 pinned, k1 in use
    assert pool.get(k(0)) == bytes([0]) * 10 and bytes(view) == bytes([1]) * 10
    view.release()
    pool.release([k(1)])
    pool.unpin([k(0), k(10), k(11)])
    assert pool.holds() == (0, 0)


def test_pool_full_when_everything_held(pool):
    for i in range(4):
        pool.put(k(i), b"a")
    pool.pin([k(i) for i in range(4)])
    with pytest.raises(PoolFull):
        pool.alloc(k(9), 1)
    pool.unpin([k(i) for i in range(4)])
    assert pool.alloc(k(9), 1) is not None
    assert pool.holds() == (0, 0)


def test_leases_expire_only_after_grace():
    now = [100.0]
    pool = ChunkPool(64, 2, lease_grace_s=1.0, clock=lambda: now[0])
    try:
        pool.alloc(k(1), 10, lease_s=2.0)
        pool.alloc(k(2), 10, lease_s=2.0)
        assert pool.reclaim_expired(102.5) == 0  # deadline passed, grace not yet
        pool.commit(k(2))
        assert pool.reclaim_expired(103.5) == 1  # k1 reclaimed, k2 committed stays
        assert pool.lookup([k(2)]) == 1 and pool.locate(k(1)) is None
        assert pool.stats().expired_leases == 1
    finally:
        pool.close()


def test_region_provider_adapter_and_shared_segment(pool):
    rp = LeaseRegionProvider(pool)
    off = rp.alloc(k(5), 64, lease_deadline=1e18)
    assert off is not None and rp.alloc(k(5), 64, 1e18) is None
    other = attach_segment(pool.segment_name)  # another mapping, as the vLLM process would
    try:
        other[off : off + 64] = os.urandom(64)
        rp.commit(k(5))
        assert pool.get(k(5)) == bytes(other[off : off + 64])
    finally:
        other.close()


def test_spill_queue(pool):
    p = ChunkPool(16, 2, spill=True, spill_queue_max=1)
    try:
        p.put(k(1), b"1" * 16, meta={"fp": b"f" * 16})
        p.put(k(2), b"2" * 16)
        p.put(k(3), b"3" * 16)  # evicts k1
        p.put(k(4), b"4" * 16)  # evicts k2, queue max 1 drops k1
        spilled = p.drain_spilled()
        assert [s[0] for s in spilled] == [k(2)] and spilled[0][1] == b"2" * 16
        assert p.stats().spill_dropped == 1
    finally:
        p.close()


class PoolMachine(RuleBasedStateMachine):
    """Random put/get/pin/unpin/evict/remove/alloc/abort sequences against a model of the pool."""

    SLOTS = 6
    SLOT = 32

    def __init__(self):
        super().__init__()
        self.pool = ChunkPool(self.SLOT, self.SLOTS)
        self.data: dict[bytes, bytes] = {}  # model: ready chunk bytes we expect (if still present)
        self.inflight: dict[bytes, bytes] = {}
        self.pins: dict[bytes, int] = {}
        self.refs: dict[bytes, list] = {}

    keys = st.integers(0, 11).map(k)

    @rule(key=keys, size=st.integers(1, SLOT), fill=st.integers(0, 255))
    def put(self, key, size, fill):
        payload = bytes([fill]) * size
        try:
            stored = self.pool.put(key, payload)
        except PoolFull:
            assert self._nothing_evictable()
            return
        if stored:
            self.data[key] = payload
        self._forget_evicted()

    @rule(key=keys, size=st.integers(1, SLOT))
    def alloc(self, key, size):
        try:
            a = self.pool.alloc(key, size)
        except PoolFull:
            assert self._nothing_evictable()
            return
        self._forget_evicted()
        if a is not None:
            payload = os.urandom(size)
            self.pool.buffer[a.offset : a.offset + size] = payload
            self.inflight[key] = payload

    @precondition(lambda self: self.inflight)
    @rule(data=st.data(), commit=st.booleans())
    def finish(self, data, commit):
        key = data.draw(st.sampled_from(sorted(self.inflight)))
        payload = self.inflight.pop(key)
        if commit:
            assert self.pool.commit(key)
            self.data[key] = payload
        else:
            assert self.pool.abort(key)
            self.pins.pop(key, None)

    @rule(key=keys)
    def get(self, key):
        got = self.pool.get(key)
        if got is not None:
            assert got == self.data[key]

    @rule(key=keys)
    def pin(self, key):
        if self.pool.pin([key]):
            self.pins[key] = self.pins.get(key, 0) + 1

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data):
        key = data.draw(st.sampled_from(sorted(self.pins)))
        assert self.pool.unpin([key]) == 1
        self.pins[key] -= 1
        if not self.pins[key]:
            del self.pins[key]

    @rule(key=keys)
    def acquire(self, key):
        view = self.pool.acquire(key)
        if view is not None:
            self.refs.setdefault(key, []).append(view)

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def release(self, data):
        key = data.draw(st.sampled_from(sorted(self.refs)))
        view = self.refs[key].pop()
        assert bytes(view) == self.data[key]  # an in-use chunk was never overwritten
        view.release()
        self.pool.release([key])
        if not self.refs[key]:
            del self.refs[key]

    @rule(key=keys)
    def remove(self, key):
        held = self.pins.get(key) or self.refs.get(key)
        removed = self.pool.remove(key)
        if removed:
            assert not held
            self.data.pop(key, None)

    def _nothing_evictable(self) -> bool:
        st_ = self.pool.stats()
        return st_.free_slots == 0 and all(
            (kk in self.pins or kk in self.refs or kk in self.inflight)
            for kk in self.pool.keys(ready_only=False)
        )

    def _forget_evicted(self):
        present = set(self.pool.keys(ready_only=False))
        for key in list(self.data):
            if key not in present:
                assert key not in self.pins, "a pinned chunk was evicted"
                assert key not in self.refs, "an in-use chunk was evicted"
                del self.data[key]

    @invariant()
    def accounting(self):
        s = self.pool.stats()
        ready = {kk: v for kk, v in self.data.items() if kk not in self.inflight}
        assert s.used_bytes == sum(len(v) for v in ready.values()) + sum(
            len(v) for v in self.inflight.values()
        )
        assert s.free_slots + len(self.pool.keys(ready_only=False)) == self.SLOTS
        assert s.ready == len(ready) and s.in_flight == len(self.inflight)
        pins, refs = self.pool.holds()
        assert pins == sum(self.pins.values()) and refs == sum(len(v) for v in self.refs.values())

    def teardown(self):
        try:
            for views in self.refs.values():
                for v in views:
                    v.release()
            for key, views in self.refs.items():
                self.pool.release([key] * len(views))
            for key, n in self.pins.items():
                self.pool.unpin([key] * n)
            for key in self.inflight:
                self.pool.abort(key)
            assert self.pool.holds() == (0, 0), "pins/refs not zero at idle"
            assert all(e.state is ChunkState.READY for e in self.pool._entries.values())
        finally:
            self.pool.close()  # never leak /dev/shm segments, also on failure


TestPoolProperties = PoolMachine.TestCase
TestPoolProperties.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
