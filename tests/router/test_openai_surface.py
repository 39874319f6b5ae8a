"""The OpenAI surface beyond one prompt and one sample, against fake workers: ``n`` > 1, batched prompts (merged
in vLLM's order, streamed or not, failing whole), prompt logits (decode-only) and the passthrough routes."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.router.test_router_api import assert_openai_error, sse_events


@pytest.fixture(params=["nixl", "push"])
def pd(request, make_harness):
    """A router in either PD mode with one prefill and one decode fake worker that tag their samples."""
    h = make_harness(pd_mode=request.param)
    extra = {"transfer_address": "127.0.0.1:1"} if request.param == "push" else {}
    p = h.add("prefill")
    d = h.add("decode", **extra)
    for w in (p, d):
        w.tag_samples = True
    return h, p, d


def test_n_samples_prefill_once_decode_n(pd):
    h, p, d = pd
    r = h.client.post("/v1/completions", json={"model": "m", "prompt": "x y", "max_tokens": 2, "n": 3})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    (pre,) = p.requests
    assert pre["n"] == 1 and pre["max_tokens"] == 1
    (dec,) = d.requests
    assert dec["n"] == 3


def test_n_out_of_range_is_a_clear_400(pd):
    h, _, _ = pd
    for n in (0, 129, "2", True):
        r = h.client.post("/v1/completions", json={"model": "m", "prompt": "x", "n": n})
        assert assert_openai_error(r, 400)["param"] == "n"


def test_batched_prompts_are_merged_in_order(pd):
    h, p, d = pd
    body = {"model": "m", "prompt": ["a", "b", "c"], "max_tokens": 2, "n": 2}
    r = h.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert [c["text"].split(":")[0] for c in out["choices"]] == ["a#0", "a#1", "b#0", "b#1", "c#0", "c#1"]
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
    assert "kv_transfer_params" not in out
    assert sorted(x["prompt"] for x in p.requests) == ["a", "b", "c"]  # one prefill leg per prompt
    assert sorted(x["prompt"] for x in d.requests) == ["a", "b", "c"]


def test_batched_token_id_prompts(pd):
    h, _, d = pd
    r = h.client.post("/v1/completions", json={"model": "m", "prompt": [[1, 2], [3, 4, 5]], "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert sorted(len(x["prompt"]) for x in d.requests) == [2, 3]
    # one token-id list (or a list holding one prompt) is not a batch
    r = h.client.post("/v1/completions", json={"model": "m", "prompt": [7, 8, 9], "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_batched_stream_rewrites_indices_and_sums_usage(pd):
    h, _, _ = pd
    body = {
        "model": "m",
        "prompt": ["a", "b"],
        "max_tokens": 3,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = h.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    *token_chunks, usage = chunks
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 12,
        "total_tokens": 14,
    }
    assert len({c["id"] for c in chunks}) == 1
    texts: dict[int, str] = {}
    for c in token_chunks:
        (choice,) = c["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert sorted(texts) == [0, 1, 2, 3]
    assert [texts[i].split(":")[0] for i in range(4)] == ["a#0", "a#1", "b#0", "b#1"]
    assert all(texts[i].endswith("t0 t1 t2 ") for i in range(4))


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_part_fails_the_batch_cleanly(pd, stream):
    h, p, d = pd
    for w in (p, d):
        w.fail_prompt = "b"
    body = {"model": "m", "prompt": ["a", "b", "c"], "max_tokens": 2, "stream": stream}
    r = h.client.post("/v1/completions", json=body)
    err = assert_openai_error(r, 400)
    assert "bad prompt" in err["message"]


def test_prompt_logits_are_computed_where_they_are_answered(pd):
    """prompt_logprobs (or echo + logprobs) need the prompt's logits: no prefill leg, the decode worker computes."""
    h, p, d = pd
    for extra in ({"prompt_logprobs": 1}, {"echo": True, "logprobs": 1}):
        r = h.client.post("/v1/completions", json={"model": "m", "prompt": "x y", "max_tokens": 1, **extra})
        assert r.status_code == 200, r.text
    assert p.requests == [] and len(d.requests) == 2
    assert all("kv_transfer_params" not in x for x in d.requests)
    r = h.client.post("/v1/completions", json={"model": "m", "prompt": "x y", "max_tokens": 1, "echo": True})
    assert r.status_code == 200 and len(p.requests) == 1  # echo alone needs no logits: PD as usual
    assert "echo" not in p.requests[0]


def test_passthrough_routes_reach_a_decode_worker(harness):
    p = harness.add("prefill")
    d = harness.add("decode")
    r = harness.client.post(
        "/tokenize", json={"model": "m", "prompt": "one two three", "kv_transfer_params": {}}
    )
    assert r.status_code == 200 and r.json()["count"] == 3
    assert d.tokenize_calls == 1 and p.tokenize_calls == 0
    r = harness.client.post("/detokenize", json={"tokens": [1, 2]})  # no model: the only one served
    assert r.status_code == 200 and r.json()["prompt"] == "w1 w2"
    r = harness.client.post("/v1/embeddings", json={"model": "m", "input": "x"})
    assert "does not support Embeddings" in assert_openai_error(r, 400)["message"]
    r = harness.client.post("/v1/responses", json={"model": "m", "input": "hi"})
    assert r.status_code == 200 and r.json()["output_text"] == "ok"
    r = harness.client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
    assert r.status_code == 200
    assert "response.completed" in r.text and "error" not in r.text  # no [DONE] in this API: not an error
    r = harness.client.get("/version")
    assert r.status_code == 200 and r.json()["version"] == "0.0-fake" and "pdmesh" in r.json()
    assert all("kv_transfer_params" not in x for x in d.requests)


def test_passthrough_errors_are_openai_errors(harness):
    harness.add("decode")
    assert_openai_error(harness.client.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404)
    assert_openai_error(harness.client.post("/tokenize", content=b"{oops"), 400)
    assert_openai_error(harness.client.post("/tokenize", json=[1, 2]), 400)
    assert_openai_error(harness.client.post("/tokenize", json={"model": 5, "prompt": "x"}), 400)


def test_passthrough_falls_back_to_a_prefill_worker_and_needs_one_worker(harness):
    assert_openai_error(harness.client.post("/tokenize", json={"model": "m", "prompt": "x"}), 503)
    p = harness.add("prefill")
    r = harness.client.post("/tokenize", json={"model": "m", "prompt": "x"})
    assert r.status_code == 200 and p.tokenize_calls == 1


def test_pool_scaling_signals(harness):
    """pdmesh_router_pool_inflight{role} and the prefill pool's queued prompt tokens rise while legs run and fall
    back to zero (the HPAs of deploy/kubernetes scale on them)."""

    p = harness.add("prefill")
    d = harness.add("decode")
    p.delay_s = 1.0
    t = threading.Thread(
        target=harness.client.post,
        args=("/v1/completions",),
        kwargs={"json": {"model": "m", "prompt": "word " * 40, "max_tokens": 2}},
    )
    t.start()
    deadline = time.monotonic() + 5
    while harness.metric("pdmesh_router_pool_inflight_tokens", role="prefill") == 0:
        assert time.monotonic() < deadline
    assert harness.metric("pdmesh_router_pool_inflight_tokens", role="prefill") == 51  # 200 chars / 4 + 1
    assert harness.metric("pdmesh_router_pool_inflight", role="prefill") == 1
    t.join(10)
    assert harness.metric("pdmesh_router_pool_inflight_tokens", role="prefill") == 0
    assert harness.metric("pdmesh_router_pool_inflight", role="prefill") == 0
    assert harness.metric("pdmesh_router_pool_inflight", role="decode") == 0
    assert len(d.requests) == 1


def test_merged_stream_closes_every_part_when_the_client_leaves_early():
    """The client goes away after one event while the parts still produce (the merge queue full): the merged
    stream ends at once and every part's relay and upstream response are closed."""
    import asyncio

    from pdmesh.router.batch import StreamMerger, merged_stream

    class Part:
        def __init__(self) -> None:
            self.closed = False
            self.relay_closed = False

        async def close(self) -> None:
            self.closed = True

    parts = [Part() for _ in range(3)]

    async def relay(part: Part):
        try:
            for i in range(10_000):
                yield f'data: {{"choices": [{{"index": 0, "text": "t{i}"}}]}}\r\n\r\n'.encode()
        finally:
            part.relay_closed = True

    async def run() -> None:
        merged = merged_stream(parts, relay, StreamMerger(3, 1, "cmpl-x", False))  # type: ignore[arg-type]
        first = await merged.__anext__()
        assert first.startswith(b"data: ") and b'"id":"cmpl-x"' in first  # \r\n framing is understood
        await asyncio.sleep(0.1)  # the pumps fill the queue and block on it
        await asyncio.wait_for(merged.aclose(), 2)

    asyncio.run(run())
    assert all(p.closed and p.relay_closed for p in parts)
