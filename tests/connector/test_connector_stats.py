"""The connector's counts as vLLM's ``KVConnectorStats`` (connector/stats.py): interval deltas from both halves,
their aggregate/reduce/reset contract, and their way through vLLM's own aggregator, serializer, Prometheus
counters and log line."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="the connector imports vLLM's connector base classes")

from prometheus_client import REGISTRY
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging, KVConnectorProm
from vllm.v1.metrics.prometheus import unregister_vllm_metrics
from vllm.v1.metrics.stats import SchedulerStats as VllmSchedulerStats
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, KVConnectorOutput
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

from pdmesh.connector.device_landing import LandingStats
from pdmesh.connector.device_push import DevicePushStats
from pdmesh.connector.metadata import ChunkOp, PdmeshConnectorMetadata
from pdmesh.connector.scheduler import SchedulerStats
from pdmesh.connector.stats import COUNTERS, PdmeshKVConnectorStats, StatsInterval, counts_of
from pdmesh.connector.vllm_connector import PdmeshConnector
from pdmesh.connector.worker import ConnectorWorker, WorkerStats
from pdmesh.kernels import bind, get_layout
from pdmesh.kvcache.keys import chunk_keys
from tests.connector.test_connector_scheduler import FP, C, FakeRequest, make
from tests.connector.test_connector_worker import MemTier, caches

KV_TRANSFER = KVTransferConfig(
    kv_connector="PdmeshConnector",
    kv_connector_module_path="pdmesh.connector.vllm_connector",
    kv_role="kv_both",
)
LABELS = {"model_name": "m", "engine": "0"}


def facade(scheduler=None, worker=None) -> SimpleNamespace:
    """The facade's state ``get_kv_connector_stats`` reads, without an engine (one half set, as vLLM builds it)."""
    return SimpleNamespace(
        _scheduler=scheduler,
        _worker=worker,
        _refused=False,
        _refused_blocks=set(),
        _refused_chunks=0,
        _refused_interval=StatsInterval(),
        shard=0,
        shards=1,
    )


def stats_of(fake) -> PdmeshKVConnectorStats | None:
    return PdmeshConnector.get_kv_connector_stats(fake)


@pytest.fixture
def prom_registry():
    """vLLM's Prometheus counters live in the process-wide registry: start and end without any."""
    unregister_vllm_metrics()
    yield REGISTRY
    unregister_vllm_metrics()


# -- the KVConnectorStats contract -----------------------------------------------------------------------


def test_aggregate_adds_counts_and_returns_itself():
    a = PdmeshKVConnectorStats(data={"lookups": 2, "skipped:prompt_embeds": 1})
    b = PdmeshKVConnectorStats(data={"lookups": 3, "loaded_chunks": 4})
    assert a.aggregate(b) is a
    assert a.data == {"lookups": 5, "skipped:prompt_embeds": 1, "loaded_chunks": 4}
    assert b.data == {"lookups": 3, "loaded_chunks": 4}  # the other one is left alone
    assert a.aggregate(PdmeshKVConnectorStats()).data == a.data


def test_reduce_is_the_non_zero_counts_and_reset_empties():
    s = PdmeshKVConnectorStats(data={"saved_chunks": 2, "save_errors": 0, "hit_tokens": 256})
    assert s.reduce() == {"hit_tokens": 256, "saved_chunks": 2}
    assert not s.is_empty() and s.count("saved_chunks") == 2 and s.count("pushes") == 0
    s.reset()
    assert s.is_empty() and s.data == {} and s.reduce() == {}
    assert PdmeshKVConnectorStats().is_empty() and PdmeshKVConnectorStats(data={"lookups": 0}).is_empty()


def test_stats_survive_pickle_and_vllms_msgpack():
    s = PdmeshKVConnectorStats(data={"lookups": 1, "skipped:multimodal_unhashed": 2})
    assert pickle.loads(pickle.dumps(s)).data == s.data  # worker process -> scheduler process
    wire = MsgpackEncoder().encode(VllmSchedulerStats(kv_connector_stats=s.to_dict()))
    got = MsgpackDecoder(VllmSchedulerStats).decode(wire).kv_connector_stats  # engine core -> API server
    assert PdmeshConnector.build_kv_connector_stats(got).data == s.data
    assert PdmeshConnector.build_kv_connector_stats(None).is_empty()


def test_interval_reports_growth_once():
    iv = StatsInterval()
    assert iv.take({"lookups": 0}) is None
    assert iv.take({"lookups": 2, "hit_tokens": 8}).data == {"lookups": 2, "hit_tokens": 8}
    assert iv.take({"lookups": 2, "hit_tokens": 8}) is None
    assert iv.take({"lookups": 5, "hit_tokens": 8, "skipped:x": 1}).data == {"lookups": 3, "skipped:x": 1}
    assert iv.take({"lookups": 1, "hit_tokens": 8, "skipped:x": 1}).data == {
        "lookups": 1
    }  # a recreated counter


def test_every_count_the_halves_keep_has_a_prometheus_counter():
    """A counter added to (or renamed in) a half's stats must be named in COUNTERS, else /metrics never shows it."""
    keys = set(counts_of(SchedulerStats())) | set(counts_of(WorkerStats()))
    keys |= set(counts_of(DevicePushStats(), "device_push_")) | set(counts_of(LandingStats(), "landing_"))
    assert keys == set(COUNTERS)
    # the dict field: by reason
    assert counts_of(SchedulerStats(skipped={"prompt_embeds": 2})) == {
        **{f.name: 0 for f in dataclasses.fields(SchedulerStats) if f.name != "skipped"},
        "skipped:prompt_embeds": 2,
    }
    assert counts_of(None) == {} and counts_of(SimpleNamespace(pushes=1)) == {}


# -- the halves behind the facade ------------------------------------------------------------------------


def test_scheduler_facade_reports_lookups_hits_skips_and_tier_errors_per_interval():
    s, tier, _ = make()
    fake = facade(scheduler=s)
    assert stats_of(fake) is None  # nothing counted yet
    prompt = list(range(1, 26))  # 3 loadable chunks
    tier.ready = set(chunk_keys(FP, prompt, C))
    assert s.get_num_new_matched_tokens(FakeRequest("hit", prompt), 0) == (24, False)
    skip = FakeRequest("skip", prompt)
    skip.prompt_embeds = object()
    s.get_num_new_matched_tokens(skip, 0)
    assert stats_of(fake).data == {"lookups": 1, "hit_tokens": 24, "skipped:prompt_embeds": 1}
    assert stats_of(fake) is None  # each count is reported once
    tier.down = True
    s.get_num_new_matched_tokens(FakeRequest("down", prompt), 0)
    assert stats_of(fake).data == {"lookups": 1, "lookup_errors": 1}


def test_scheduler_facade_reports_pd_waits_and_fallbacks():
    s, tier, clock = make()
    fake = facade(scheduler=s)
    prompt = list(range(1, 26))
    keys = chunk_keys(FP, prompt, C)
    req = FakeRequest("d", prompt, {"pdmesh": {"transfer_id": "t1", "deadline_ms": 500}})
    tier.ready = {keys[0]}
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    assert stats_of(fake).data == {"lookups": 1, "pd_waits": 1}
    clock.t = 0.6
    assert s.get_num_new_matched_tokens(req, 0) == (8, False)
    assert stats_of(fake).data == {"lookups": 1, "pd_fallbacks": 1, "hit_tokens": 8}


def test_worker_facade_reports_saves_loads_and_load_errors():
    tier = MemTier()
    w = ConnectorWorker(tier, bind(caches(1), get_layout("cpu_attn")), blocks_per_chunk=2)
    fake = facade(worker=w)
    keys = [b"k" * 16, b"j" * 16]
    w.save(PdmeshConnectorMetadata(saves=[ChunkOp("r", keys, [[3, 7], [1, 0]])]))
    n = w.chunk_nbytes
    assert stats_of(fake).data == {"saved_chunks": 2, "saved_bytes": 2 * n}
    w.save(PdmeshConnectorMetadata(saves=[ChunkOp("r", keys, [[3, 7], [1, 0]])]))
    w.load(PdmeshConnectorMetadata(loads=[ChunkOp("q", [*keys, b"x" * 16], [[9, 2], [5, 11], [4, 6]])]))
    assert stats_of(fake).data == {
        "skipped_saves": 2,
        "loaded_chunks": 2,
        "loaded_bytes": 2 * n,
        "load_errors": 1,
    }
    assert stats_of(fake) is None


def test_worker_facade_counts_the_device_paths_stats():
    w = ConnectorWorker(MemTier(), bind(caches(1), get_layout("cpu_attn")), blocks_per_chunk=2)
    w.device_push = SimpleNamespace(stats=DevicePushStats())
    w.landing = SimpleNamespace(stats=LandingStats())
    fake = facade(worker=w)
    w.device_push.stats.pushes, w.device_push.stats.bytes = 1, 4096  # counted by the push thread
    w.landing.stats.landed = 3  # counted by the landing's receiver thread
    assert stats_of(fake).data == {"device_push_pushes": 1, "device_push_bytes": 4096, "landing_landed": 3}


def test_a_refused_worker_reports_its_planned_loads_as_load_errors():
    meta = PdmeshConnectorMetadata(loads=[ChunkOp("q", [b"a" * 16, b"b" * 16], [[1, 2], [3, 4]])])
    fake = facade()
    fake._refused = True
    fake._get_connector_metadata = lambda: meta
    PdmeshConnector.start_load_kv(fake, None)
    assert stats_of(fake).data == {"load_errors": 2}
    assert PdmeshConnector.get_block_ids_with_load_errors(fake) == {1, 2, 3, 4}
    assert stats_of(fake) is None and stats_of(facade()) is None  # a worker before register_kv_caches


def test_stats_never_raise_into_the_engine_step():
    broken = SimpleNamespace(take_stats=lambda: 1 / 0)
    assert stats_of(facade(scheduler=broken)) is None


# -- through vLLM's own machinery ------------------------------------------------------------------------


def test_stats_reach_vllms_prometheus_counters_and_log_line(prom_registry):
    """vLLM 0.32's path: each worker's stats ride its model runner output (pickled), KVOutputAggregator sums
    them, the scheduler adds its own, the sum crosses to the API server as SchedulerStats.kv_connector_stats,
    where KVConnectorProm (our build_prom_metrics) and KVConnectorLogging (build_kv_connector_stats) take it."""
    outputs = []
    for _rank in range(2):  # an engine of two worker processes, each loading its part of 3 chunks
        out = copy.copy(EMPTY_MODEL_RUNNER_OUTPUT)
        part = PdmeshKVConnectorStats(data={"loaded_chunks": 3, "loaded_bytes": 300})
        out.kv_connector_output = KVConnectorOutput(kv_connector_stats=part)
        outputs.append(pickle.loads(pickle.dumps(out)))
    worker_stats = KVOutputAggregator(expected_finished_count=2).aggregate(outputs).kv_connector_output
    scheduler_stats = PdmeshKVConnectorStats(
        data={"lookups": 1, "hit_tokens": 384, "skipped:prompt_embeds": 1}
    )
    total = worker_stats.kv_connector_stats.aggregate(scheduler_stats)  # as Scheduler.update_from_output does
    wire = MsgpackEncoder().encode(VllmSchedulerStats(kv_connector_stats=total.to_dict()))
    data = MsgpackDecoder(VllmSchedulerStats).decode(wire).kv_connector_stats

    vllm_config = SimpleNamespace(kv_transfer_config=KV_TRANSFER)
    prom = KVConnectorProm(vllm_config, list(LABELS), {0: list(LABELS.values())})
    # every counter is there (at 0) before the first event
    assert prom_registry.get_sample_value("vllm:pdmesh_pd_fallbacks_total", LABELS) == 0
    prom.observe(data, 0)
    prom.observe({"lookups": 2}, 0)  # the next step's delta
    value = prom_registry.get_sample_value
    assert value("vllm:pdmesh_loaded_chunks_total", LABELS) == 6
    assert value("vllm:pdmesh_loaded_bytes_total", LABELS) == 600
    assert value("vllm:pdmesh_lookups_total", LABELS) == 3
    assert value("vllm:pdmesh_hit_tokens_total", LABELS) == 384
    assert value("vllm:pdmesh_skipped_requests_total", {**LABELS, "reason": "prompt_embeds"}) == 1

    logging = KVConnectorLogging(KV_TRANSFER)
    logging.observe(data)
    logging.observe({"lookups": 2})
    lines: list[str] = []
    logging.log(lambda fmt, *args: lines.append(fmt % args))
    assert lines == [
        "KV Transfer metrics: hit_tokens=384, loaded_bytes=600, loaded_chunks=6, lookups=3, skipped:prompt_embeds=1"
    ]
