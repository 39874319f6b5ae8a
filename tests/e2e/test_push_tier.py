"""Push mode with the KV tier doing real work: reuse across prefill workers through the shared remote tier,
failures of the tier and of a push (answers never change), and no leaked pins, leases or blocks at idle.

Cluster: 2 prefill + 1 decode workers, each with its own tier server, all writing through to one pdmesh cache
server. Tests run in file order and the later ones break things on purpose.
"""

from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from pdmesh.cluster import ClusterSpec, LocalCluster
from pdmesh.procs import free_port
from pdmesh.worker import shm_leftovers
from pdmesh.worker.tier_process import chunk_nbytes_for_model
from tests.e2e.conftest import ALWAYS_PD_ENV
from tests.e2e.oracle import MODEL, WORDS, reference_engine, scrape, token_ids

pytestmark = pytest.mark.e2e
ARGS = ["--max-model-len", "4096", "--seed", "0"]
C = 128  # chunk tokens (the CPU block size)

_rng = random.Random(11)
_WORDS = WORDS
PREFIX = " ".join(_rng.choice(_WORDS) for _ in range(2100))  # ~2k+ tokens shared by two requests


def _req(prompt: str, n: int = 8) -> tuple[str, dict]:
    return "/v1/completions", {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "return_token_ids": True,
    }


SHARED_A = _req(PREFIX + " first question about memory")
SHARED_B = _req(PREFIX + " second question about streams")
FRESH = [_req(" ".join(_rng.choice(_WORDS) for _ in range(300 + 50 * i)) + f" q{i}") for i in range(4)]
ALL = [SHARED_A, SHARED_B, *FRESH]


@pytest.fixture(scope="module")
def expected(tiny_model, tmp_path_factory) -> dict[str, list[int]]:
    with reference_engine(tiny_model, ARGS, tmp_path_factory.mktemp("ref-tier")) as (url, c):
        return {body["prompt"]: token_ids(path, body, url, c) for path, body in ALL}


@pytest.fixture(scope="module")
def cluster(expected, tiny_model, tmp_path_factory):
    spec = ClusterSpec(
        model=tiny_model, served_model_name=MODEL, port=free_port(), pd_mode="push", prefillers=2, decoders=1,
        cache_server=True, vllm_args=ARGS, log_dir=str(tmp_path_factory.mktemp("push-tier")), startup_timeout=300,
        # round robin over the two prefill workers: the tests send a prefix to one and its sharer to the other
        env={**ALWAYS_PD_ENV, "PDMESH_ROUTER_POLICIES_PREFILL": "round_robin", "PDMESH_ROUTER_POLICIES_DECODE": "round_robin"},
    )  # fmt: skip
    with LocalCluster(spec) as c:
        yield c


def _workers(cluster) -> dict[str, dict]:
    with httpx.Client(timeout=10, trust_env=False) as c:
        return {w["worker_id"]: w for w in c.get(cluster.url + "/internal/workers").json()}


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=10, trust_env=False).text


def _tier_stats(cluster, worker: str) -> dict:
    info = cluster.tier_info(worker)
    return httpx.get(info["http"] + "/stats", timeout=10, trust_env=False).json()


def _check(cluster, expected, req) -> None:
    path, body = req
    assert token_ids(path, body, cluster.url) == expected[body["prompt"]]


def test_prefix_reused_by_the_other_prefill_worker_via_remote_tier(cluster, expected):
    workers = _workers(cluster)
    before = {w: _metrics(workers[w]["url"]) for w in ("prefill-0", "prefill-1")}
    _check(
        cluster, expected, SHARED_A
    )  # round robin: prefill-0 computes, saves, writes through to the remote
    chunk = chunk_nbytes_for_model(cluster.spec.model, "float32", C)
    deadline = time.monotonic() + 60  # write-through to the cache server is asynchronous: wait for the prefix
    while _tier_stats(cluster, "prefill-0")["remote"]["bytes_written"] < 16 * chunk:
        assert time.monotonic() < deadline, _tier_stats(cluster, "prefill-0")
        time.sleep(0.2)
    _check(
        cluster, expected, SHARED_B
    )  # prefill-1 has nothing locally: it loads the prefix from the remote tier
    after = {w: _metrics(workers[w]["url"]) for w in ("prefill-0", "prefill-1")}
    name, src = "vllm:prompt_tokens_cached_by_source_total", "host"
    reused = {w: scrape(after[w], name, source=src) - scrape(before[w], name, source=src) for w in after}
    computed = {
        w: scrape(after[w], "vllm:prompt_tokens_by_source_total", source="local_compute")
        - scrape(before[w], "vllm:prompt_tokens_by_source_total", source="local_compute")
        for w in after
    }
    assert reused["prefill-0"] == 0 and computed["prefill-0"] > 2000, (reused, computed)
    assert reused["prefill-1"] >= 2048, (reused, computed)  # the shared prefix, whole chunks
    assert computed["prefill-1"] < computed["prefill-0"] - 1500
    remote = _tier_stats(cluster, "prefill-1")["counters"]["remote"]
    assert remote.get("hits", 0) >= 16, remote
    # transfer metrics on the tiers' /metrics: both prefill workers pushed, the decoder's tier received
    pushed = sum(
        scrape(_metrics(cluster.tier_info(w)["http"]), "pdmesh_tier_push_bytes_total") for w in after
    )
    assert pushed >= 16 * chunk
    assert scrape(_metrics(cluster.tier_info("decode-0")["http"]), "pdmesh_tier_received_commits_total") >= 1


def test_fresh_prompts_concurrency_16(cluster, expected):
    reqs = [FRESH[i % len(FRESH)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda r: token_ids(r[0], r[1], cluster.url), reqs))
    assert got == [expected[b["prompt"]] for _, b in reqs]


def test_mixed_load_then_idle_leaves_nothing_held(cluster):
    rng = random.Random(5)
    prompts = [PREFIX[: rng.randrange(200, 4000)] + f" tail {i}" for i in range(12)]

    def one(i: int) -> int:
        body = {
            "model": MODEL,
            "prompt": prompts[i % len(prompts)],
            "max_tokens": rng.choice([1, 4, 16]),
            "temperature": 0,
        }
        kind = i % 4
        with httpx.Client(timeout=120, trust_env=False) as c:
            if kind == 3:  # client disconnects mid-stream
                with c.stream(
                    "POST", cluster.url + "/v1/completions", json={**body, "stream": True, "max_tokens": 64}
                ) as r:
                    for _ in r.iter_lines():
                        break
                return 499
            if kind == 2:  # aborted quickly (client timeout)
                try:
                    c.post(cluster.url + "/v1/completions", json={**body, "max_tokens": 200}, timeout=0.3)
                except httpx.TimeoutException:
                    return 408
            return c.post(cluster.url + "/v1/completions", json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes.count(200) >= 100, codes
    assert all(code in (200, 408, 499) for code in codes), codes
    workers = _workers(cluster)
    deadline = time.monotonic() + 60
    while True:
        usage = {w: scrape(_metrics(workers[w]["url"]), "vllm:kv_cache_usage_perc") for w in workers}
        running = {w: scrape(_metrics(workers[w]["url"]), "vllm:num_requests_running") for w in workers}
        stats = {w: _tier_stats(cluster, w)["memory"] for w in workers}
        held = {w: (s["pinned"], s["in_use"], s["in_flight"]) for w, s in stats.items()}
        if all(v == 0 for v in usage.values()) and all(h == (0, 0, 0) for h in held.values()):
            break
        assert time.monotonic() < deadline, (usage, running, held)
        time.sleep(1)
    chunk = chunk_nbytes_for_model(cluster.spec.model, "float32", C)
    for w, s in stats.items():  # pool accounting: the bytes in use are exactly the ready chunks
        assert s["ready"] > 0 and s["used_bytes"] == s["ready"] * chunk, (w, s)


def test_push_frozen_then_prefill_killed_decoder_recomputes(cluster, expected):
    """The prefill side's tier server hangs (SIGSTOP) so no chunk reaches the decoder; the prefill worker is
    then killed. The decoder waits up to its deadline, computes everything itself; the answer is unchanged and
    the router counts the fallback."""
    frozen = [cluster.tier_info(w)["pid"] for w in ("prefill-0", "prefill-1")]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        fresh = _req(" ".join(_rng.choice(_WORDS) for _ in range(500)) + " frozen")
        with httpx.Client(timeout=120, trust_env=False) as c:
            t0 = time.monotonic()
            r = c.post(cluster.url + fresh[0], json=fresh[1])
            took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert r.json()["kv_transfer_params"]["pdmesh"]["fallback"] is True
        assert took < 60
        router_metrics = _metrics(cluster.url)
        assert scrape(router_metrics, "pdmesh_router_pd_requests_total", mode="transfer_fallback") >= 1
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    agent = psutil.Process(cluster.workers["prefill-1"].pid)
    held = {
        p
        for p in shm_leftovers.segments_of(p.pid for p in [agent, *agent.children(recursive=True)])
        if os.path.basename(p).startswith(shm_leftovers.PREFIXES)  # vLLM's (the tiers' pools are the tiers')
    }
    # (none in these tests' one-process engines, VLLM_ENABLE_V1_MULTIPROCESSING=0; tests/cli/test_shm_leftovers.py)
    cluster.kill_worker("prefill-1", signal.SIGKILL)
    # the killed engine could not unlink its shared memory: the cluster did
    assert not [p for p in held if os.path.exists(p)], held
    _check(cluster, expected, FRESH[0])


def test_remote_tier_down_then_tier_servers_killed_answers_unchanged(cluster, expected):
    cluster.cache_server.signal_group(signal.SIGKILL)
    cluster.cache_server.stop(5)
    cluster.cache_server = None
    for req in (SHARED_B, FRESH[1]):
        _check(cluster, expected, req)
    for w in ("prefill-0", "decode-0"):
        os.kill(cluster.tier_info(w)["pid"], signal.SIGKILL)
    for req in (SHARED_A, FRESH[2], FRESH[3]):
        _check(cluster, expected, req)
