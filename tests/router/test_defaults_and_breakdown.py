"""The shipped defaults (cache-aware pools, conditional PD, data-parallel pools) and the TTFT breakdown
(histogram per stage, OpenTelemetry spans to a real OTLP/HTTP endpoint)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request, Response
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from pdmesh.router.config import RouterConfig
from pdmesh.router.ttft_breakdown import Marks
from tests.router.test_pd_push import _add, _wait_until
from tests.servers import ThreadServer

DEFAULTS = RouterConfig().model_dump(include={"policies", "conditional_pd"})
# 2600 tokens for the fake workers' tokenizer: above min_uncached_tokens and idle_decoder_max_uncached_tokens
LONG = " ".join(f"w{i}" for i in range(2600))
MID = " ".join(
    f"m{i}" for i in range(700)
)  # above min_uncached_tokens, below idle_decoder_max_uncached_tokens


def _long_workers(*workers) -> None:
    for w in workers:
        w.max_model_len = 100_000


def test_defaults_are_cache_aware_with_conditional_pd():
    cfg = RouterConfig()
    assert cfg.policies.prefill == cfg.policies.decode == "cache_aware"
    assert cfg.conditional_pd.min_uncached_tokens == 512
    assert cfg.conditional_pd.max_prefill_queue_tokens == 4096
    assert cfg.conditional_pd.idle_decoder_max_uncached_tokens == 2048


def test_a_prompt_goes_decode_only_to_an_idle_decoder_and_through_pd_to_a_busy_one(make_harness):
    h = make_harness(pd_mode="push", **DEFAULTS)
    p = _add(h, "prefill", "p0", "10.1.1.1:7001")
    d = _add(h, "decode", "d0", "10.2.2.2:7002")
    _long_workers(p, d)
    # nothing in flight on D: D computes the 700 tokens itself (no stream to protect from them)
    assert h.client.post("/v1/completions", json={"model": "m", "prompt": MID, "max_tokens": 2}).is_success
    assert not p.requests and "kv_transfer_params" not in d.requests[-1]
    assert h.metric("pdmesh_router_decode_only_total", reason="idle_decoder") == 1
    # longer than the bound: PD even on an idle decoder
    assert h.client.post("/v1/completions", json={"model": "m", "prompt": LONG, "max_tokens": 2}).is_success
    assert len(p.requests) == 1 and "kv_transfer_params" in d.requests[-1]
    # a request in flight on D: the next prompt of the same size goes through PD
    d.delay_s = 1.0
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(
            h.client.post, "/v1/completions", json={"model": "m", "prompt": "busy", "max_tokens": 2}
        )
        _wait_until(lambda: len(d.requests) == 3, 2.0)
        other = {"model": "m", "prompt": "x " + MID, "max_tokens": 2}
        assert h.client.post("/v1/completions", json=other).is_success
        assert busy.result().is_success
    assert len(p.requests) == 2 and "kv_transfer_params" in d.requests[-1]
    assert h.metric("pdmesh_router_decode_only_total", reason="idle_decoder") == 1


def test_short_prompt_goes_decode_only_long_prompt_takes_both_legs(make_harness):
    h = make_harness(pd_mode="push", **DEFAULTS)
    p = _add(h, "prefill", "p0", "10.1.1.1:7001")
    d = _add(h, "decode", "d0", "10.2.2.2:7002")
    _long_workers(p, d)
    assert h.client.post(
        "/v1/completions", json={"model": "m", "prompt": "hi there", "max_tokens": 2}
    ).is_success
    assert not p.requests and len(d.requests) == 1
    assert h.metric("pdmesh_router_decode_only_total", reason="short_prompt") == 1
    assert h.client.post("/v1/completions", json={"model": "m", "prompt": LONG, "max_tokens": 2}).is_success
    assert len(p.requests) == 1 and "kv_transfer_params" in d.requests[-1]
    # the same prompt again: D holds it now (it was pushed there), so nothing is left to prefill
    assert h.client.post("/v1/completions", json={"model": "m", "prompt": LONG, "max_tokens": 2}).is_success
    assert len(p.requests) == 1
    assert h.metric("pdmesh_router_decode_only_total", reason="short_prompt") == 2


def test_workers_of_both_roles_form_a_data_parallel_pool(make_harness):
    h = make_harness(pd_mode="push", **DEFAULTS)
    a = _add(h, "both", "a", "10.1.1.1:7001")
    b = _add(h, "both", "b", "10.1.1.2:7001")
    _long_workers(a, b)
    for i in range(4):
        prompt = f"user{i} " + LONG
        assert h.client.post(
            "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 2}
        ).is_success
    legs = a.requests + b.requests
    assert len(legs) == 4 and all(
        "kv_transfer_params" not in r for r in legs
    )  # one worker per request, no PD
    assert h.metric("pdmesh_router_decode_only_total", reason="data_parallel") == 4
    # with a prefill-only worker added, the "both" workers decode and PD takes place again
    p = _add(h, "prefill", "p", "10.1.1.3:7001")
    _long_workers(p)
    assert h.client.post(
        "/v1/completions", json={"model": "m", "prompt": "x " + LONG, "max_tokens": 2}
    ).is_success
    assert h.metric("pdmesh_router_pd_requests_total", mode="push") == 1


def test_stage_histogram_for_a_push_pd_stream(make_harness):
    h = make_harness(pd_mode="push")
    _add(h, "prefill", "p0", "10.1.1.1:7001")
    _add(h, "decode", "d0", "10.2.2.2:7002")
    with h.client.stream("POST", "/v1/completions", json={**_body(), "stream": True}) as r:
        assert r.status_code == 200 and b"[DONE]" in r.read()
    for stage in ("route", "prefill_leg", "decode_first_byte", "decode_after_prefill"):
        assert h.metric("pdmesh_router_ttft_stage_seconds_count", stage=stage) == 1, stage


def test_marks_give_only_reached_stages():
    m = Marks(arrived=10.0, routed=10.1, decode_start=10.1, first_byte=10.6)
    assert m.stages() == {"route": (10.0, 10.1), "decode_first_byte": (10.1, 10.6)}


def _body() -> dict:
    return {"model": "m", "prompt": "hello there", "max_tokens": 3}


class _Collector:
    """An OTLP/HTTP trace receiver: keeps every exported span (protobuf bodies, as the exporter sends them)."""

    def __init__(self) -> None:
        self.spans: list = []
        app = FastAPI()

        @app.post("/v1/traces")
        async def traces(request: Request) -> Response:
            msg = ExportTraceServiceRequest()
            msg.ParseFromString(await request.body())
            for rs in msg.resource_spans:
                service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                for ss in rs.scope_spans:
                    self.spans += [(service, s) for s in ss.spans]
            return Response(b"", media_type="application/x-protobuf")

        self.server = ThreadServer(app).start()


def test_spans_exported_over_otlp_per_request_and_stage(make_harness):
    collector = _Collector()
    try:
        h = make_harness(pd_mode="push", tracing={"otlp_endpoint": collector.server.url + "/v1/traces"})
        _add(h, "prefill", "p0", "10.1.1.1:7001")
        _add(h, "decode", "d0", "10.2.2.2:7002")
        with h.client.stream("POST", "/v1/completions", json={**_body(), "stream": True}) as r:
            assert r.status_code == 200 and b"[DONE]" in r.read()
        h.close()  # the router's shutdown flushes the span processor
        spans = {s.name: (service, s) for service, s in collector.spans}
        service, root = spans["pdmesh.request"]
        assert service == "pdmesh-router"
        attrs = {a.key: a.value for a in root.attributes}
        assert attrs["http.route"].string_value == "/v1/completions"
        assert attrs["http.response.status_code"].int_value == 200
        for stage in ("route", "prefill_leg", "decode_first_byte", "decode_after_prefill"):
            _, span = spans[stage]
            assert span.trace_id == root.trace_id and span.parent_span_id == root.span_id, stage
            assert root.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
            assert span.end_time_unix_nano <= root.end_time_unix_nano
    finally:
        collector.server.stop()


def test_decoder_whose_tier_holds_the_prompt_serves_it_alone(make_harness):
    """Conditional PD asks the decoders' tiers too: a prompt the decode worker's tier (or the remote tier behind
    it) holds skips the prefill leg, though the router never routed it there."""
    app = FastAPI()

    @app.post("/lookup")
    async def lookup(request: Request) -> dict:
        n = len((await request.json())["token_ids"])
        return {"chunks": 1, "tokens": n - 1, "total_chunks": 1, "tiers": ["remote"]}

    tier = ThreadServer(app).start()
    try:
        h = make_harness(pd_mode="push", **DEFAULTS, cache_aware={"tier_lookup_timeout_s": 2.0})
        p = h.add("prefill", name="p0", transfer_address="10.1.1.1:7001")
        d = h.add("decode", name="d0", transfer_address="10.2.2.2:7002", tier_url=tier.url)
        _long_workers(p, d)
        assert h.client.post(
            "/v1/completions", json={"model": "m", "prompt": LONG, "max_tokens": 2}
        ).is_success
        assert not p.requests and len(d.requests) == 1
        assert h.metric("pdmesh_router_decode_only_total", reason="short_prompt") == 1
    finally:
        tier.stop()


def test_a_decoder_waiting_for_a_pd_request_is_not_idle(make_harness):
    h = make_harness(pd_mode="push", **DEFAULTS)
    p = _add(h, "prefill", "p0", "10.1.1.1:7001")
    d = _add(h, "decode", "d0", "10.2.2.2:7002")
    _long_workers(p, d)
    p.delay_s = 1.0  # the PD request's prefill leg runs; its decode leg is not on D yet
    with ThreadPoolExecutor(1) as pool:
        pd = pool.submit(
            h.client.post, "/v1/completions", json={"model": "m", "prompt": LONG, "max_tokens": 2}
        )
        _wait_until(lambda: p.requests, 2.0)
        assert not d.requests  # D's in-flight count is 0: only the pending PD request says D is taken
        p.delay_s = 0.0
        mid = {"model": "m", "prompt": MID, "max_tokens": 2}
        assert h.client.post("/v1/completions", json=mid).is_success
        assert pd.result().is_success
    assert len(p.requests) == 2  # the mid-size prompt went through PD too
    assert h.metric("pdmesh_router_decode_only_total", reason="idle_decoder") == 0


def _empty_tier(asked: list[int]) -> FastAPI:
    """A tier that holds nothing and notes the length of every lookup in ``asked``."""
    app = FastAPI()

    @app.post("/lookup")
    async def lookup(request: Request) -> dict:
        asked.append(len((await request.json())["token_ids"]))
        return {"chunks": 0, "tokens": 0, "total_chunks": 1, "tiers": []}

    return app


def test_the_tier_lookup_is_not_skipped_when_the_holder_is_too_busy_to_be_chosen(make_harness):
    asked: list[int] = []
    tier = ThreadServer(_empty_tier(asked)).start()
    try:
        cache_aware = {"tier_lookup_timeout_s": 2.0, "max_load_imbalance": 0}
        h = make_harness(pd_mode="push", **DEFAULTS, cache_aware=cache_aware)
        p = h.add("prefill", name="p0", transfer_address="10.1.1.1:7001", tier_url=tier.url)
        d0 = h.add("decode", name="d0", transfer_address="10.2.2.2:7002", tier_url=tier.url)
        d1 = h.add("decode", name="d1", transfer_address="10.2.2.3:7002", tier_url=tier.url)
        _long_workers(p, d0, d1)
        first = {"model": "m", "prompt": LONG, "max_tokens": 2}
        assert h.client.post("/v1/completions", json=first).is_success
        holder = d0 if d0.requests else d1
        holder.delay_s = 1.0
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(h.client.post, "/v1/completions", json={**first, "prompt": LONG + " busy"})
            _wait_until(
                lambda: len(holder.requests) == 2, 2.0
            )  # it holds the prompt: the cache-aware choice sends it there
            n_asked = len(asked)
            follow_up = {"model": "m", "prompt": LONG + " and one more question", "max_tokens": 2}
            assert h.client.post("/v1/completions", json=follow_up).is_success
            assert busy.result().is_success
        assert (
            len(asked) > n_asked
        )  # the holder is busier: the choice may pass it over, so the tiers were asked
        # only the request sent while the holder was idle skipped them
        assert h.metric("pdmesh_router_tier_lookups_total", outcome="skipped") == 1
    finally:
        tier.stop()


@contextlib.contextmanager
def _pair_with_empty_tiers(make_harness) -> Iterator[tuple]:
    """A push-mode router with the defaults, one prefill and one decode worker whose tiers hold nothing and note
    every lookup's length in ``asked``: (harness, prefill, decode, asked)."""
    asked: list[int] = []
    tier = ThreadServer(_empty_tier(asked)).start()
    try:
        h = make_harness(pd_mode="push", **DEFAULTS, cache_aware={"tier_lookup_timeout_s": 2.0})
        p = h.add("prefill", name="p0", transfer_address="10.1.1.1:7001", tier_url=tier.url)
        d = h.add("decode", name="d0", transfer_address="10.2.2.2:7002", tier_url=tier.url)
        _long_workers(p, d)
        yield h, p, d, asked
    finally:
        tier.stop()


def test_a_prompt_the_router_saw_go_to_a_decoder_skips_the_tier_lookup(make_harness):
    with _pair_with_empty_tiers(make_harness) as (h, p, d, asked):
        first = {"model": "m", "prompt": LONG, "max_tokens": 2}
        assert h.client.post("/v1/completions", json=first).is_success
        assert len(p.requests) == 1 and asked  # nobody held it: the tiers were asked, then PD
        n_asked = len(asked)
        assert h.metric("pdmesh_router_tier_lookups_total", outcome="asked") == 1
        # the next turn: the router pushed the first prompt to d0, so it knows d0 holds all but the new words
        follow_up = {"model": "m", "prompt": LONG + " and one more question", "max_tokens": 2}
        assert h.client.post("/v1/completions", json=follow_up).is_success
        assert len(asked) == n_asked and len(p.requests) == 1  # no lookup, decode-only on d0
        assert "kv_transfer_params" not in d.requests[-1]
        assert h.metric("pdmesh_router_tier_lookups_total", outcome="skipped") == 1
        assert h.metric("pdmesh_router_decode_only_total", reason="short_prompt") == 1
        # an unrelated prompt is looked up again
        assert h.client.post("/v1/completions", json={**first, "prompt": "other " + LONG}).is_success
        assert len(asked) > n_asked


def test_a_prompt_the_rules_send_decode_only_whatever_the_tiers_hold_skips_the_lookup(make_harness):
    """One decoder: a prompt shorter than min_uncached_tokens, or one within the idle bound while it is idle, goes
    decode-only there whatever the tiers say, so they are not asked; a busy decoder makes the tiers count again."""
    with _pair_with_empty_tiers(make_harness) as (h, p, d, asked):
        short = {"model": "m", "prompt": "a short question", "max_tokens": 2}
        assert h.client.post("/v1/completions", json=short).is_success
        assert h.client.post("/v1/completions", json={**short, "prompt": MID}).is_success
        assert not asked and not p.requests
        assert h.metric("pdmesh_router_tier_lookups_total", outcome="skipped") == 2
        assert h.metric("pdmesh_router_decode_only_total", reason="idle_decoder") == 1
        # longer than the idle bound: the tiers may hold it, so they are asked
        assert h.client.post("/v1/completions", json={**short, "prompt": LONG}).is_success
        assert len(asked) == 2 and len(p.requests) == 1  # both tiers asked, then PD
        # a request in flight on D: a mid-size prompt may go through PD, so the tiers are asked
        d.delay_s = 1.0
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(h.client.post, "/v1/completions", json={**short, "prompt": "busy"})
            _wait_until(lambda: len(d.requests) == 4, 2.0)
            assert h.client.post("/v1/completions", json={**short, "prompt": "y " + MID}).is_success
            assert busy.result().is_success
        assert len(asked) == 4 and len(p.requests) == 2
        assert h.metric("pdmesh_router_tier_lookups_total", outcome="asked") == 2


def test_prompts_go_decode_only_while_the_prefill_pool_is_queued(make_harness):
    h = make_harness(pd_mode="push", **{**DEFAULTS, "conditional_pd": {"max_prefill_queue_tokens": 500}})
    p = _add(h, "prefill", "p0", "10.1.1.1:7001")
    d = _add(h, "decode", "d0", "10.2.2.2:7002")
    _long_workers(p, d)
    p.delay_s = 1.0  # a long prefill: 700 tokens in flight
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            h.client.post, "/v1/completions", json={"model": "m", "prompt": LONG, "max_tokens": 2}
        )
        _wait_until(lambda: p.requests, 2.0)
        other = {"model": "m", "prompt": "y " + LONG, "max_tokens": 2}
        assert h.client.post("/v1/completions", json=other).is_success  # served by D alone meanwhile
        assert len(p.requests) == 1 and first.result().is_success
    assert h.metric("pdmesh_router_decode_only_total", reason="prefill_queue") == 1
    assert h.client.post(
        "/v1/completions", json={"model": "m", "prompt": "z " + LONG, "max_tokens": 2}
    ).is_success
    assert len(p.requests) == 2  # the queue is empty again: PD
