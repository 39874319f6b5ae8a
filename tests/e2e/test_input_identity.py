"""Never KV that belongs to other inputs, on real vLLM through push PD: two LoRA adapters built on the tiny model,
the base model, and two tenants' ``cache_salt`` send the same prompt, in orders that would serve one's cached or
pushed KV to the other if the keys did not tell them apart; each answer equals one engine's with the same adapter
and salt.

Cluster: 1 prefill + 1 decode worker with ``--enable-lora`` and both adapters, every prompt through both legs.
The router learns the adapters from the workers' heartbeats (a request for an adapter is not a 404).
"""

from __future__ import annotations

import random

import httpx
import pytest

from pdmesh.cluster import ClusterSpec, LocalCluster
from pdmesh.lora_adapter import write_lora_adapter
from pdmesh.procs import free_port
from tests.e2e.conftest import ALWAYS_PD_ENV
from tests.e2e.oracle import MODEL, WORDS, reference_engine, scrape, token_ids

pytestmark = pytest.mark.e2e

_rng = random.Random(5)
PROMPT = " ".join(_rng.choice(WORDS) for _ in range(700))  # several 128-token chunks
ADAPTERS = ("tenant-a-lora", "tenant-b-lora")
# (model, cache_salt): the identities that must never share KV, in the order they are sent
CASES = [
    (MODEL, None),
    (ADAPTERS[0], None),
    (ADAPTERS[1], None),
    (MODEL, "tenant-a"),
    (MODEL, "tenant-b"),
    (ADAPTERS[0], "tenant-a"),
]


def _body(model: str, salt: str | None) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    if salt is not None:
        body["cache_salt"] = salt
    return body


@pytest.fixture(scope="module")
def lora_args(tiny_model, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("adapters")
    mods = [
        f"{name}={write_lora_adapter(tiny_model, root / name, seed=i + 1)}" for i, name in enumerate(ADAPTERS)
    ]
    return [
        "--max-model-len", "2048", "--seed", "0", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
        "--lora-modules", *mods,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def expected(tiny_model, lora_args, tmp_path_factory) -> dict[tuple, list[int]]:
    with reference_engine(tiny_model, lora_args, tmp_path_factory.mktemp("ref-identity")) as (url, c):
        out = {case: token_ids("/v1/completions", _body(*case), url, c) for case in CASES}
    # the oracle itself tells the identities apart (else this test could not fail)
    assert len({tuple(v) for v in out.values()}) >= 3, out
    return out


@pytest.fixture(scope="module")
def cluster(expected, tiny_model, lora_args, tmp_path_factory):
    spec = ClusterSpec(
        model=tiny_model, served_model_name=MODEL, port=free_port(), pd_mode="push", prefillers=1, decoders=1,
        vllm_args=lora_args, log_dir=str(tmp_path_factory.mktemp("identity")), startup_timeout=300,
        env=dict(ALWAYS_PD_ENV),
    )  # fmt: skip
    with LocalCluster(spec) as c:
        yield c


def test_router_serves_every_adapter_the_workers_serve(cluster):
    with httpx.Client(timeout=30, trust_env=False) as c:
        ids = {m["id"] for m in c.get(cluster.url + "/v1/models").json()["data"]}
        assert {MODEL, *ADAPTERS} <= ids
        r = c.post(cluster.url + "/v1/completions", json=_body("no-such-adapter", None))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_each_adapter_and_tenant_gets_its_own_single_engine_answer(cluster, expected):
    workers = {
        w["worker_id"]: w
        for w in httpx.get(cluster.url + "/internal/workers", timeout=10, trust_env=False).json()
    }
    decode_url = workers["decode-0"]["url"]
    before = httpx.get(decode_url + "/metrics", timeout=10, trust_env=False).text
    # twice around: the second round finds every identity's chunks in the tiers (its own, never another's)
    for _ in range(2):
        for case in CASES:
            got = token_ids("/v1/completions", _body(*case), cluster.url)
            assert got == expected[case], case
    after = httpx.get(decode_url + "/metrics", timeout=10, trust_env=False).text
    # the decode worker loaded pushed or cached chunks (PD ran), and computed only the tails
    name = "vllm:prompt_tokens_cached_by_source_total"
    loaded = sum(scrape(after, name, source=s) - scrape(before, name, source=s) for s in ("host", "p2p"))
    assert loaded >= len(CASES) * 128, loaded
    # the connector's own counts reach vLLM's /metrics (connector/stats.py): the scheduler half's hits (each one
    # vLLM counted above was offered by it) and the worker half's chunk loads, which cross from the model runner
    grew = {
        n: scrape(after, f"vllm:pdmesh_{n}_total") - scrape(before, f"vllm:pdmesh_{n}_total")
        for n in ("hit_tokens", "loaded_chunks", "lookups")
    }
    assert grew["hit_tokens"] >= loaded and grew["loaded_chunks"] > 0 and grew["lookups"] > 0, grew
