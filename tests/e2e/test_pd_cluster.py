"""1 prefill + 1 decode worker behind the router, in both PD modes (pdmesh push, stock NIXL pull), against a
single engine's tokens. The module's cluster fixture is parametrized: every test runs once per mode."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from pdmesh.cluster import ClusterSpec, LocalCluster
from pdmesh.procs import ManagedProcess, free_port
from pdmesh.security import TOKEN_HEADER, worker_api_key
from pdmesh.transfer.nixl_backend import nixl_available
from tests.e2e.conftest import ALWAYS_PD_ENV, ENGINE_ARGS
from tests.e2e.oracle import MODEL, make_requests, reference_engine, scrape, token_ids
from tests.e2e.surface import CASES, answer, same
from tests.netns import REPO, HostPair, netns_unavailable

pytestmark = pytest.mark.e2e
REQUESTS = make_requests()


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> dict:
    """What a single plain vLLM engine (no KV connector, same engine args) answers, sequential requests:
    ``tokens`` for :data:`REQUESTS`, ``surface`` for the field cases of :mod:`tests.e2e.surface`."""
    with reference_engine(tiny_model, ENGINE_ARGS, tmp_path_factory.mktemp("ref")) as (url, c):
        out = [token_ids(path, _non_streaming(body), url, c) for path, body in REQUESTS]
        surface = {name: answer(url, path, body, c) for name, path, body in CASES}
    assert all(out), "reference engine produced empty outputs"
    return {"tokens": out, "surface": surface}


@pytest.fixture(scope="module")
def expected(reference) -> list[list[int]]:
    return reference["tokens"]


@pytest.fixture(scope="module", params=["push", "nixl"])
def cluster(request, expected, tiny_model, tmp_path_factory):
    spec = ClusterSpec(
        model=tiny_model,
        served_model_name=MODEL,
        port=free_port(),
        pd_mode=request.param,
        # push (the default mode) behind two router processes: registrations, heartbeats and metrics cross them
        router_processes=2 if request.param == "push" else 1,
        vllm_args=ENGINE_ARGS,
        log_dir=str(tmp_path_factory.mktemp(f"cluster-{request.param}")),
        startup_timeout=300,
        # a cluster secret as in production: workers' engines need the key derived from it, push targets are signed.
        # push runs the shipped router defaults (long prompts PD, short ones decode-only) but for the idle-decoder
        # rule, which would send every prompt of these one-at-a-time tests decode-only (the rule: tests/router);
        # nixl sends all through PD
        env={
            "PDMESH_CLUSTER_TOKEN": TOKEN,
            **(ALWAYS_PD_ENV if request.param == "nixl" else NO_IDLE_RULE_ENV),
        },
    )
    with LocalCluster(spec) as c:
        yield c


TOKEN = "e2e-cluster-secret"
NO_IDLE_RULE_ENV = {"PDMESH_ROUTER_CONDITIONAL_PD_IDLE_DECODER_MAX_UNCACHED_TOKENS": "0"}


def _non_streaming(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}


def _worker_url(cluster: LocalCluster, role: str) -> str:
    with httpx.Client(timeout=10, trust_env=False, headers={TOKEN_HEADER: TOKEN}) as c:
        workers = c.get(cluster.url + "/internal/workers").json()
    return next(w["url"] for w in workers if w["role"] == role and w["healthy"])


def test_pd_tokens_equal_single_engine_sequential(cluster, expected):
    with httpx.Client(timeout=300, trust_env=False) as c:
        for (path, body), want in zip(REQUESTS, expected, strict=True):
            assert token_ids(path, body, cluster.url, c) == want, (path, body.get("stream"))


def test_pd_tokens_equal_single_engine_concurrency_16(cluster, expected):
    assert len(REQUESTS) == 16
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda req: token_ids(req[0], req[1], cluster.url), REQUESTS))
    assert got == expected


def test_decoder_got_prompt_by_kv_transfer(cluster):
    decode_url = _worker_url(cluster, "decode")
    prefill_url = _worker_url(cluster, "prefill")
    with httpx.Client(timeout=60, trust_env=False) as c:
        before = c.get(decode_url + "/metrics").text
        # A prompt no engine has seen (the decoder's own prefix cache must not serve it).
        prompt = " ".join(f"fresh{i}" for i in range(200))  # ~1,000 tokens: over the default 512, so PD
        r = c.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3})
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
        after = c.get(decode_url + "/metrics").text
        prefill_metrics = c.get(prefill_url + "/metrics").text
    name = "vllm:prompt_tokens_by_source_total"
    transferred = scrape(after, name, source="external_kv_transfer") - scrape(
        before, name, source="external_kv_transfer"
    )
    computed = scrape(after, name, source="local_compute") - scrape(before, name, source="local_compute")
    assert prompt_tokens > 512
    if cluster.spec.pd_mode == "nixl":
        assert transferred >= prompt_tokens - 1, (prompt_tokens, transferred, computed)
        assert computed == 0, f"decoder computed {computed} prompt tokens itself"
    else:
        # push moves whole chunks (128 tokens here); the last partial chunk and the last token are computed
        chunk = 128
        assert transferred == (prompt_tokens - 1) // chunk * chunk, (prompt_tokens, transferred, computed)
        assert computed == prompt_tokens - transferred < chunk + 1
        cached = "vllm:prompt_tokens_cached_by_source_total"
        assert scrape(after, cached, source="p2p") - scrape(before, cached, source="p2p") == transferred
    assert scrape(prefill_metrics, name, source="local_compute") > 0


def test_openai_client(cluster):
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    c = client.completions.create(model=MODEL, prompt="prefill decode cache", max_tokens=6, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens == 6
    stream = client.completions.create(
        model=MODEL, prompt="prefill decode", max_tokens=5, temperature=0, stream=True
    )
    assert (
        "".join(ch.choices[0].text for ch in stream if ch.choices)
        == client.completions.create(model=MODEL, prompt="prefill decode", max_tokens=5, temperature=0)
        .choices[0]
        .text
    )
    msgs = [{"role": "user", "content": "hello router"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    pieces = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=6, temperature=0, stream=True
    )
    assert (
        "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
        == chat.choices[0].message.content
    )


def _router_text(cluster, path: str, body: dict) -> str:
    """The answer's text straight from the router (the reference the clients below must reproduce)."""
    r = httpx.post(cluster.url + path, json=body, timeout=120, trust_env=False)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_langchain_openai_client(cluster):
    """langchain-openai's chat model and completion LLM, plain and streamed, against the router."""
    from langchain_openai import ChatOpenAI, OpenAI

    prompt = "the decode worker streams tokens"
    chat_want = _router_text(
        cluster,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 7,
            "temperature": 0,
        },
    )
    llm = ChatOpenAI(
        base_url=cluster.url + "/v1",
        api_key="unused",
        model=MODEL,
        temperature=0,
        max_tokens=7,
        max_retries=0,
    )
    assert llm.invoke(prompt).content == chat_want
    assert "".join(str(c.content) for c in llm.stream(prompt)) == chat_want
    text_want = _router_text(
        cluster, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 7, "temperature": 0}
    )
    completion = OpenAI(
        base_url=cluster.url + "/v1",
        api_key="unused",
        model=MODEL,
        temperature=0,
        max_tokens=7,
        max_retries=0,
    )
    assert completion.invoke(prompt) == text_want
    assert "".join(completion.stream(prompt)) == text_want


def test_litellm_client(cluster, monkeypatch):
    """litellm (OpenAI-compatible provider) chat and text completions, plain and streamed."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from the internet at import
    import litellm

    prompt = "a cache hit on any worker"
    messages = [{"role": "user", "content": prompt}]
    common = {
        "model": f"openai/{MODEL}",
        "api_base": cluster.url + "/v1",
        "api_key": "unused",
        "temperature": 0,
    }
    chat_want = _router_text(
        cluster,
        "/v1/chat/completions",
        {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0},
    )
    r = litellm.completion(messages=messages, max_tokens=6, **common)
    assert r.choices[0].message.content == chat_want
    chunks = litellm.completion(messages=messages, max_tokens=6, stream=True, **common)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_want
    text_want = _router_text(
        cluster, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0}
    )
    t = litellm.text_completion(prompt=prompt, max_tokens=6, **common)
    assert t.choices[0].text == text_want


def _completions_by_status(cluster) -> Counter:
    """The router's own count of /v1/completions requests (all router processes), by final HTTP status."""
    text = httpx.get(cluster.url + "/metrics", timeout=10).text
    statuses = set(re.findall(r'^pdmesh_router_requests_total\{[^}]*status="(\d+)"', text, re.M))
    name = "pdmesh_router_requests_total"
    return Counter({s: int(scrape(text, name, endpoint="/v1/completions", status=s)) for s in statuses})


def test_guidellm_load_has_no_failed_requests(cluster, tiny_model, tmp_path):
    """A third-party load generator (guidellm: synthetic prompts from the model's own tokenizer, constant rate,
    streamed completions) against the cluster: every request succeeds."""
    if cluster.spec.pd_mode != "push":
        pytest.skip("one load run is enough: push is the default mode")
    import subprocess
    import sys

    before = _completions_by_status(cluster)
    out = tmp_path / "guidellm.json"
    cmd = [
        sys.executable, "-m", "guidellm", "run",
        "--backend", f"kind=openai_http,target={cluster.url},model={MODEL},request_format=/v1/completions",
        "--profile", "kind=constant,rate=2",
        "--data", "kind=synthetic_text,prompt_tokens=200,output_tokens=16",
        "--tokenizer", f"kind=hf_auto,model={tiny_model}",
        "--constraint", "kind=max_requests,count=30",
        "--output", f"kind=json,path={out}",
        "--disable-console-interactive",
    ]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    (bench,) = report["benchmarks"]
    totals = bench["metrics"]["request_totals"]
    assert totals["errored"] == 0 and totals["incomplete"] == 0, totals
    # guidellm's max_requests constraint may stop one request short (a request cancelled at the stop is not counted).
    assert totals["successful"] == totals["total"] >= 25, totals
    served = _completions_by_status(cluster) - before
    assert served["200"] >= totals["total"] and not served.keys() - {"200"}, served


def test_plan_from_live_metrics(cluster, capsys):
    """`pdmesh plan --from-router`: while clients send PD traffic (prompts of 600-1400 fresh tokens, 16 tokens
    out), the planner measures service times from the engines' own metrics and the load from the router's, and
    plans from them; the measured load matches what the clients sent."""
    if cluster.spec.pd_mode != "push":
        pytest.skip("one live-metrics run is enough: push is the default mode")
    import random
    import threading

    from pdmesh.cli import main
    from pdmesh.plan_live import ClusterScraper

    stop, sent, lengths = threading.Event(), [], []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=120, trust_env=False) as c:
            while not stop.is_set():
                n = rng.randrange(600, 1400)
                body = {"model": MODEL, "prompt": [rng.randrange(10, 3000) for _ in range(n)], "max_tokens": 16,
                        "temperature": 0, "ignore_eos": True}  # fmt: skip
                if c.post(cluster.url + "/v1/completions", json=body).status_code == 200:
                    sent.append(time.monotonic())
                    lengths.append(n)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)  # traffic flowing before the window opens
        with ClusterScraper(cluster.url, TOKEN) as scraper:
            t0, n0 = time.monotonic(), len(sent)
            seen = scraper.observe(window_s=10, interval_s=2)
            client_rate = (len(sent) - n0) / (time.monotonic() - t0)
        code = main(["plan", "--from-router", cluster.url, "--token", TOKEN, "--window", "6",
                     "--ttft-slo", "30", "--itl-slo", "1"])  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(150)
    assert seen.workers == {"prefill": 1, "decode": 1}
    assert seen.fitted.prefill_points >= 2 and seen.fitted.decode_points >= 2
    p = seen.fitted.profile
    assert p.prefill_tokens_per_s > 0 and p.decode_step_s > 0
    w = seen.workload
    assert 0.5 * client_rate <= w.rate <= 2.0 * client_rate, (w.rate, client_rate)
    assert min(lengths) <= w.prompt_tokens <= max(lengths)  # token-id prompts: the router counts them exactly
    assert w.output_tokens == pytest.approx(16, rel=0.25)  # generated on the decode engine per request
    assert w.hit_rate < 0.2  # fresh prompts: computed, not cached
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["prefill"] >= 1 and report["observed"]["workers"] == {"prefill": 1, "decode": 1}


def test_bad_input_against_real_workers(cluster):
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 3000, max_tokens=4)
    assert "Traceback" not in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with httpx.Client(timeout=30, trust_env=False) as c:
        r = c.post(
            cluster.url + "/v1/chat/completions",
            content=b"{oops",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"]["message"]


def test_workers_engines_refuse_direct_clients_and_survive_hostile_params(cluster):
    """Clients reach only the router: a worker's vLLM needs the key the router derives from the cluster token,
    and connector params that reach an engine anyway (from anyone holding the key) never crash it."""
    decode_url = _worker_url(cluster, "decode")
    prefill_url = _worker_url(cluster, "prefill")
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 2}
    key = {"Authorization": f"Bearer {worker_api_key(TOKEN)}"}
    with httpx.Client(timeout=60, trust_env=False) as c:
        for url in (decode_url, prefill_url):
            assert c.post(url + "/v1/completions", json=body).status_code == 401
            assert (
                c.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer x"}).status_code
                == 401
            )
        if cluster.spec.pd_mode == "push":
            hostile = [
                {"kv_transfer_params": "boom"},
                {"vllm_xargs": {"kv_transfer_params": "boom"}},
                {
                    "kv_transfer_params": {"pdmesh": {"transfer_id": "t", "push_to": "127.0.0.1:1"}}
                },  # unsigned
                {"kv_transfer_params": {"pdmesh": {"transfer_id": 7, "deadline_ms": "nan"}}},
            ]
            for extra in hostile:
                # vLLM may refuse one of these itself (its API process reads vllm_xargs' kv_transfer_params as
                # an object: a 500 for that request); what matters is that the engine survives it
                r = c.post(prefill_url + "/v1/completions", json={**body, **extra}, headers=key)
                assert r.status_code in (200, 400, 500), (extra, r.status_code, r.text[:200])
                again = c.post(prefill_url + "/v1/completions", json=body, headers=key)
                assert again.status_code == 200, (extra, again.text[:200])
        # the engines still serve, through the router, with exact PD
        r = c.post(cluster.url + "/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_openai_fields_through_pd_equal_single_engine(cluster, reference, case):
    """n > 1, batched prompts (plain, streamed, token ids), echo/logprobs/prompt_logprobs, stop, seed, JSON mode,
    tools, user, max_completion_tokens, usage streaming: the same answer as one engine, field by field."""
    name, path, body = case
    want = reference["surface"][name]
    with httpx.Client(timeout=300, trust_env=False) as c:
        got = answer(cluster.url, path, body, c)
    assert want["status"] == 200 or name in ("json-object", "tools-required"), (name, want)
    assert same(got, want), (name, got, want)


def test_decoder_killed_mid_stream_then_replaced(cluster):
    """Last in this module: it replaces the decode worker."""
    body = {
        "model": MODEL,
        "prompt": "stream for a long time",
        "max_tokens": 1500,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    events: list[dict] = []
    with (
        httpx.Client(timeout=120, trust_env=False) as c,
        c.stream("POST", cluster.url + "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        killed = False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            assert line != "data: [DONE]", "stream finished before the decoder was killed"
            events.append(json.loads(line[6:]))
            if len(events) == 3 and not killed:
                cluster.kill_worker("decode-0", signal.SIGKILL)
                killed = True
    assert killed
    assert "error" in events[-1], events[-1]
    assert events[-1]["error"]["code"] == "PD_PEER_UNAVAILABLE"

    # The router is still up; with the only decoder dead, requests fail cleanly (no 500, no hang)...
    with httpx.Client(timeout=60, trust_env=False) as c:
        r = c.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code in (502, 503), r.text
        assert r.json()["error"]["message"]
    # ... and once a decode worker is back, they are served again.
    cluster.add_worker("decode")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with httpx.Client(timeout=60, trust_env=False) as c:
            r = c.post(
                cluster.url + "/v1/completions",
                json={"model": MODEL, "prompt": "back again", "max_tokens": 4},
            )
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]


# -- two hosts: the prefill worker in one network namespace, the decode worker in another (tests/netns.py) -----
_NETNS = netns_unavailable()
_NIXL_PARAM = pytest.param(
    "nixl", marks=pytest.mark.skipif(not nixl_available(), reason="nixl is not installed")
)


@pytest.fixture(scope="module", params=["tcp", _NIXL_PARAM])
def two_hosts(request, tiny_model, tmp_path_factory):
    """Router + prefill worker (and its tier) on host A, decode worker (and its tier) on host B; pushes forced
    onto ``request.param`` (the namespaces share /dev/shm, so the default order would take shm)."""
    if _NETNS:
        pytest.skip(_NETNS)
    logs = tmp_path_factory.mktemp(f"two-hosts-{request.param}")
    with HostPair() as hosts:
        a, b = hosts.addr["a"], hosts.addr["b"]
        router_url = f"http://{a}:8000"
        base = {
            **os.environ, "PDMESH_CLUSTER_TOKEN": TOKEN, "PDMESH_TIER_TRANSFER_BACKENDS": request.param,
            "UCX_TLS": "tcp", "PDMESH_RUN_DIR": str(logs), **ALWAYS_PD_ENV,
        }  # fmt: skip
        cli = [sys.executable, "-m", "pdmesh.cli"]
        worker = ["--model", tiny_model, "--served-model-name", MODEL, "--tier-http-port", "8300"]
        procs = [
            ManagedProcess("router", hosts.argv("a", [*cli, "router", "--host", a, "--port", "8000"]),
                           base, str(logs / "router.log")),
            ManagedProcess("prefill-0", hosts.argv("a", [*cli, "prefiller", "--router", router_url, "--host", a,
                           "--port", "8100", "--worker-id", "prefill-0", *worker, "--", *ENGINE_ARGS]),
                           {**base, "UCX_NET_DEVICES": hosts.dev["a"], "VLLM_CPU_OMP_THREADS_BIND": "0"},
                           str(logs / "prefill-0.log")),
            ManagedProcess("decode-0", hosts.argv("b", [*cli, "decoder", "--router", router_url, "--host", b,
                           "--port", "8200", "--worker-id", "decode-0", *worker, "--", *ENGINE_ARGS]),
                           {**base, "UCX_NET_DEVICES": hosts.dev["b"], "VLLM_CPU_OMP_THREADS_BIND": "1"},
                           str(logs / "decode-0.log")),
        ]  # fmt: skip
        try:
            client = [sys.executable, "-m", "tests.e2e.netns_client"]
            up = subprocess.run(
                hosts.argv("a", [*client, "health", router_url, "300"]), cwd=REPO, timeout=330
            )
            assert up.returncode == 0, f"two-host cluster not ready; logs in {logs}"
            yield hosts, router_url, request.param, logs
        finally:
            for p in reversed(procs):
                p.stop(15)


def test_push_between_two_hosts_equals_single_engine(two_hosts, expected):
    hosts, url, backend, logs = two_hosts
    client = [sys.executable, "-m", "tests.e2e.netns_client", "tokens", url]
    done = subprocess.run(hosts.argv("a", client), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
    # the prompts really crossed the link, over the backend asked for
    prefill_tier = "".join(p.read_text() for p in logs.glob("*prefill-0*tier*.log"))
    assert f"pushing to {hosts.addr['b']}:" in prefill_tier and f"over {backend}" in prefill_tier, (
        prefill_tier[-2000:]
    )
