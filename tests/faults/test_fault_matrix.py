"""The fault matrix on real processes: one process killed at each protocol step, then the answers and the books.

Cluster: router + 1 prefill + 1 decode worker (real vLLM engines, the tiny model, prefix caching off so every
reuse goes through the tier), each node with its tier server (memory + disk), the prefill node's remote tier a
pdmesh cache server, the decode node's a real redis-server, the cluster token set. Processes die at a protocol
step through failpoints (:mod:`pdmesh.failpoints`: armed by a file, fired once by the first process that gets
there). After each fault:

- the request that met the fault gets exactly the single engine's tokens, within the push deadline plus its
  compute time (no wait past the deadline);
- the killed process is back (the worker agent restarts its tier or its engine; ``pdmesh up``'s supervision,
  :meth:`LocalCluster.supervise`, the router and the cache server) and later requests are exact too;
- at idle nothing is held anywhere: tier pins, in-use and in-flight chunks, receiver leases, pushes in flight,
  vLLM KV cache usage all back to zero.

Tests run in file order on one cluster.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from pdmesh.cluster import ClusterSpec, LocalCluster
from pdmesh.failpoints import ENV as FAILPOINTS_ENV
from pdmesh.failpoints import arm, fired_by
from pdmesh.procs import free_port
from pdmesh.security import TOKEN_HEADER
from tests.e2e.conftest import ALWAYS_PD_ENV, ENGINE_ARGS
from tests.e2e.oracle import MODEL, WORDS, reference_engine, scrape, token_ids

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

TOKEN = "fault-matrix-secret"
DEADLINE_S = 5.0  # the router's pd_transfer_deadline_ms default
SLACK_S = 20.0  # compute on a 2-core machine, the fallback's recompute, a restart in the background
_rng = random.Random(23)
PROMPTS = [" ".join(_rng.choice(WORDS) for _ in range(260 + 15 * i)) + f" case {i}" for i in range(24)]


def _body(i: int, stream: bool = False) -> dict:
    return {
        "model": MODEL,
        "prompt": PROMPTS[i],
        "max_tokens": 8,
        "temperature": 0,
        "return_token_ids": True,
        "stream": stream,
    }


@pytest.fixture(scope="module")
def expected(tiny_model, tmp_path_factory) -> list[list[int]]:
    with reference_engine(tiny_model, ENGINE_ARGS, tmp_path_factory.mktemp("ref-faults")) as (url, c):
        return [token_ids("/v1/completions", _body(i), url, c) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("failpoints"))


@pytest.fixture(scope="module")
def cluster(expected, tiny_model, tmp_path_factory, fp_dir, redis_process):
    logs = tmp_path_factory.mktemp("faults")
    spec = ClusterSpec(
        model=tiny_model, served_model_name=MODEL, port=free_port(), pd_mode="push", prefillers=0, decoders=0,
        cache_server=True, vllm_args=[*ENGINE_ARGS, "--no-enable-prefix-caching"], log_dir=str(logs),
        startup_timeout=300,
        env={
            "PDMESH_CLUSTER_TOKEN": TOKEN, FAILPOINTS_ENV: fp_dir, "PDMESH_TIER_DISK_ENABLED": "true",
            "PDMESH_TIER_DISK_WRITE_THROUGH": "true", "PDMESH_TIER_DISK_FSYNC": "false", **ALWAYS_PD_ENV,
        },
    )  # fmt: skip
    with LocalCluster(spec) as c:
        c.add_worker("prefill", env={"PDMESH_TIER_DISK_PATH": str(logs / "disk-prefill")})
        c.add_worker(
            "decode",
            env={
                "PDMESH_TIER_DISK_PATH": str(logs / "disk-decode"),
                "PDMESH_TIER_REMOTE_URL": redis_process.url,
            },
        )
        c.wait_ready(1, 1, 300)
        yield c


# -- helpers ----------------------------------------------------------------------------------------------------
def _check(cluster: LocalCluster, expected: list[list[int]], i: int, stream: bool = False) -> float:
    """Send prompt ``i``; assert the single engine's tokens; return the time it took."""
    t0 = time.monotonic()
    got = token_ids("/v1/completions", _body(i, stream), cluster.url)
    took = time.monotonic() - t0
    assert got == expected[i], f"prompt {i}: {got} != {expected[i]}"
    return took


def _tier(cluster: LocalCluster, worker: str, path: str, body: dict | None = None) -> dict:
    info = cluster.tier_info(worker)
    headers = {TOKEN_HEADER: TOKEN}
    with httpx.Client(timeout=10, trust_env=False, headers=headers) as c:
        r = c.post(info["http"] + path, json=body) if body is not None else c.get(info["http"] + path)
    r.raise_for_status()
    return r.json()


def _registered(cluster: LocalCluster) -> dict[str, dict]:
    r = httpx.get(
        cluster.url + "/internal/workers", headers={TOKEN_HEADER: TOKEN}, timeout=10, trust_env=False
    )
    return {w["worker_id"]: w for w in r.json()}


def _wait(what: str, predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (httpx.HTTPError, LookupError, OSError, ValueError) as e:
            last = e
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def _wait_tier_restarted(cluster: LocalCluster, worker: str, old_pid: int) -> None:
    """The worker agent restarted the node's tier and advertises its transfer address again."""

    def back() -> bool:
        if cluster.tier_info(worker)["pid"] == old_pid:
            return False
        _tier(cluster, worker, "/stats")
        return bool(_registered(cluster).get(worker, {}).get("transfer_address"))

    _wait(f"{worker}'s tier to be restarted and advertised", back)


def _written(cluster: LocalCluster, worker: str, tier: str) -> int:
    """Bytes the node's tier wrote through to ``tier`` (disk or remote) so far."""
    s = _tier(cluster, worker, "/stats")
    return s["remote"]["bytes_written"] if tier == "remote" else s["counters"]["disk"].get("bytes_written", 0)


def _wait_written_back(cluster: LocalCluster, worker: str, tier: str, before: int) -> None:
    def done() -> bool:
        queue = _tier(cluster, worker, "/stats")["writeback_queue"]
        return queue == 0 and _written(cluster, worker, tier) > before

    _wait(f"{worker}'s write-through to {tier}", done, 30)


def _assert_nothing_held(cluster: LocalCluster) -> None:
    """Pins, in-use and in-flight chunks, receiver leases, pushes in flight and vLLM KV usage all back to zero."""
    workers = _registered(cluster)

    def idle() -> dict | None:
        held = {}
        for w, reg in workers.items():
            s = _tier(cluster, w, "/stats")
            m = s["memory"]
            metrics = httpx.get(reg["url"] + "/metrics", timeout=10, trust_env=False).text
            held[w] = (
                m["pinned"], m["in_use"], m["in_flight"],
                s["transfer"]["receive"]["leases"], s["transfer"]["pushes_in_flight"],
                scrape(metrics, "vllm:kv_cache_usage_perc"), scrape(metrics, "vllm:num_requests_running"),
            )  # fmt: skip
        return None if any(any(v) for v in held.values()) else held

    _wait("nothing held at idle", idle, 60)


def _fault_then_exact(cluster, expected, fp_dir, failpoint: str, i: int, pid: int, why=lambda: "") -> None:
    before = set(fired_by(fp_dir, failpoint))
    arm(fp_dir, failpoint)
    took = _check(cluster, expected, i)
    fired = sorted(set(fired_by(fp_dir, failpoint)) - before)
    assert fired == [pid], f"{failpoint} fired by {fired}, not {pid}; {why()}"
    assert took < DEADLINE_S + SLACK_S, took


# -- the matrix -------------------------------------------------------------------------------------------------
def test_baseline_exact_and_idle(cluster, expected):
    for i in (0, 1):
        _check(cluster, expected, i)
    _check(cluster, expected, 0, stream=True)
    _assert_nothing_held(cluster)


@pytest.mark.parametrize(
    "failpoint, i",
    [("transfer.sender.after_alloc", 2), ("transfer.sender.after_write", 4)],
    ids=["after-alloc-before-write", "after-write-before-commit"],
)
def test_sender_killed_mid_push(cluster, expected, fp_dir, failpoint, i):
    """The prefill node's tier dies while pushing: the decoder waits at most the deadline and computes."""
    pid = cluster.tier_info("prefill-0")["pid"]
    _fault_then_exact(cluster, expected, fp_dir, failpoint, i, pid)
    _wait_tier_restarted(cluster, "prefill-0", pid)
    _check(cluster, expected, i)
    _check(cluster, expected, i + 1, stream=True)
    _assert_nothing_held(cluster)


def test_receiver_killed_at_alloc(cluster, expected, fp_dir):
    pid = cluster.tier_info("decode-0")["pid"]
    _fault_then_exact(cluster, expected, fp_dir, "transfer.receiver.alloc", 6, pid)
    _wait_tier_restarted(cluster, "decode-0", pid)
    _check(cluster, expected, 6)
    _check(cluster, expected, 7)
    _assert_nothing_held(cluster)


@pytest.mark.parametrize("source, i", [("disk", 8), ("remote", 9)])
def test_tier_killed_in_the_middle_of_a_load(cluster, expected, fp_dir, source, i):
    """The prefill node's tier dies after allocating a slot for a chunk it reads from disk (or the cache server):
    the engine computes what it could not load."""
    before = _written(cluster, "prefill-0", source)
    _check(cluster, expected, i)  # computed, saved, written through to disk and the cache server
    _wait_written_back(cluster, "prefill-0", source, before)
    _assert_nothing_held(cluster)  # the push is over: no chunk is held, so clearing drops them all
    _tier(cluster, "prefill-0", "/clear", {"tiers": ["memory"] if source == "disk" else ["memory", "disk"]})
    assert _tier(cluster, "prefill-0", "/stats")["memory"]["ready"] == 0
    pid = cluster.tier_info("prefill-0")["pid"]
    # fired by the prefill node's tier: the proof that it was loading (the failpoint sits between slot and read)
    stats = lambda: _tier(cluster, "prefill-0", "/stats")  # noqa: E731
    _fault_then_exact(cluster, expected, fp_dir, "kvcache.tier.load", i, pid, stats)
    _wait_tier_restarted(cluster, "prefill-0", pid)
    _check(cluster, expected, i)
    _assert_nothing_held(cluster)


def test_cache_server_killed_in_the_middle_of_a_payload(cluster, expected, fp_dir):
    before = _written(cluster, "prefill-0", "remote")
    _check(cluster, expected, 10)
    _wait_written_back(cluster, "prefill-0", "remote", before)
    _assert_nothing_held(cluster)
    _tier(cluster, "prefill-0", "/clear", {"tiers": ["memory", "disk"]})
    assert _tier(cluster, "prefill-0", "/stats")["memory"]["ready"] == 0
    _fault_then_exact(cluster, expected, fp_dir, "kvcache.cache_server.payload", 10, cluster.cache_server.pid)
    assert not cluster.cache_server.alive()
    assert cluster.supervise() == ["cache-server"]  # what `pdmesh up` does every second
    _check(cluster, expected, 11)
    _wait(
        "the prefill tier's remote to be up again",
        lambda: _tier(cluster, "prefill-0", "/stats")["remote"]["up"],
    )
    _check(cluster, expected, 10)
    _assert_nothing_held(cluster)


def test_redis_killed_under_load(cluster, expected, redis_process):
    """The decode node's remote (Redis) dies while 8 requests run; all answers exact; Redis back, used again."""
    killer = threading.Timer(0.5, redis_process.kill)
    killer.start()
    with ThreadPoolExecutor(4) as pool:
        took = list(pool.map(lambda i: _check(cluster, expected, i), [12, 13, 14, 15] * 2))
    killer.join()
    assert max(took) < DEADLINE_S + SLACK_S, took
    _check(cluster, expected, 16)  # Redis down: misses fast
    redis_process.start()
    _wait(
        "the decode tier's remote to be up again",
        lambda: _tier(cluster, "decode-0", "/stats")["remote"]["up"],
    )
    _check(cluster, expected, 17)
    _assert_nothing_held(cluster)


def test_router_killed_with_workers_registered(cluster, expected):
    """kill -9 of the (single-process) router: restarted, the workers' heartbeats register them within seconds."""
    cluster.router.signal_group(signal.SIGKILL)
    _wait("the router to die", lambda: not cluster.router.alive(), 10)
    assert cluster.supervise() == ["router"]
    t0 = time.monotonic()
    cluster.wait_router(30)
    cluster.wait_ready(1, 1, 30)
    assert time.monotonic() - t0 < 15
    _check(cluster, expected, 18)
    _check(cluster, expected, 19, stream=True)
    _assert_nothing_held(cluster)


def test_decode_engine_killed_mid_stream_is_restarted(cluster, expected):
    """kill -9 of the decoder's vLLM during a stream: the stream ends (an error, no hang), the worker agent
    restarts the engine and registers again, later answers are exact."""
    agent = psutil.Process(cluster.workers["decode-0"].pid)
    engines = [p for p in agent.children(recursive=True) if "vllm.entrypoints" in " ".join(p.cmdline())]
    assert len(engines) == 1, engines
    body = {**_body(20, stream=True), "max_tokens": 400, "ignore_eos": True}
    ended = threading.Event()

    def stream() -> None:
        try:
            with httpx.stream(
                "POST", cluster.url + "/v1/completions", json=body, timeout=60, trust_env=False
            ) as r:
                for n, _line in enumerate(r.iter_lines()):
                    if n == 3:
                        engines[0].kill()
        except httpx.HTTPError:
            pass
        ended.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert ended.wait(60), "the stream did not end after its decoder's engine was killed"
    _wait("the decoder to leave the router", lambda: "decode-0" not in _registered(cluster), 10)
    cluster.wait_ready(1, 1, 240)
    (new,) = [p for p in agent.children(recursive=True) if "vllm.entrypoints" in " ".join(p.cmdline())]
    assert new.pid != engines[0].pid
    _check(cluster, expected, 21)
    _check(cluster, expected, 22, stream=True)
    _assert_nothing_held(cluster)


def test_nothing_fired_twice_and_no_failpoint_left_armed(fp_dir):
    left = [f for f in os.listdir(fp_dir) if ".fired." not in f]
    assert left == []
    fired = sorted(f.split(".fired.")[0] for f in os.listdir(fp_dir))
    armed = ["transfer.sender.after_alloc", "transfer.sender.after_write", "transfer.receiver.alloc"]
    armed += ["kvcache.tier.load", "kvcache.tier.load", "kvcache.cache_server.payload"]
    assert fired == sorted(armed)  # every failpoint armed fired exactly once
