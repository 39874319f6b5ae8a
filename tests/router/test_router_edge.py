"""The router's public edge under hostile or oversized input: request heads bounded in bytes (431 before the
request exists), prompts validated to clean 400s (never a 500), batched prompts and ``n`` admitted per sequence
with a cap per request, and the passthrough routes under the same body timeout and request deadline as the
completion routes."""

from __future__ import annotations

import json
import socket
import time

import pytest

from pdmesh.http_guard import guarded_protocol
from pdmesh.router.app import create_app
from pdmesh.router.config import LimitsConfig, RouterConfig
from pdmesh.router.errors import OpenAIError
from pdmesh.router.limits import Limiter
from pdmesh.router.openai_requests import check_prompt, request_parts
from tests.router.conftest import TOKEN
from tests.router.test_router_api import COMPLETION, assert_openai_error
from tests.router.test_router_production import wait_until
from tests.servers import ThreadServer

# --- request heads bounded in bytes -------------------------------------------------------------------------


@pytest.fixture
def edge():
    """A router served by the production protocol (pdmesh/http_guard.py) with the limits its config names."""
    config = RouterConfig(cluster_token=TOKEN, header_timeout_s=5.0, max_head_bytes=8192)
    http = guarded_protocol(config.header_timeout_s, config.max_connections, config.max_head_bytes)
    srv = ThreadServer(create_app(config), http=http).start()
    yield srv
    srv.stop()


def _exchange(port: int, data: bytes, limit_s: float = 4.0) -> tuple[bytes, bool, float]:
    """Send ``data`` on a fresh connection; what came back, whether the server closed, and how long it took."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as s:
        s.sendall(data)
        got, closed = b"", False
        while time.monotonic() - t0 < limit_s:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            got += chunk
    return got, closed, time.monotonic() - t0


def _assert_431(got: bytes) -> None:
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), got[:200]
    assert b"connection: close" in head.lower()
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "request_head_too_large"
    assert set(err) == {"message", "type", "param", "code"} and "8192 bytes" in err["message"]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health?q=" + b"a" * (20 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a 20 MiB URL
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (1 << 20) + b"\r\n\r\n",  # a 1 MiB header
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n",  # many small headers
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",  # just past the limit
    ],
    ids=["huge-url", "huge-header", "many-headers", "just-past"],
)
def test_a_request_head_past_max_head_bytes_is_431_and_closed(edge, head):
    got, closed, took = _exchange(edge.port, head)
    _assert_431(got)
    assert closed and took < 3  # closed after the answer, long before the header timeout (5 s)


def test_an_unfinished_head_past_the_limit_is_refused_at_once(edge):
    """No terminating blank line yet: the bytes received already pass the limit, so the head timeout is not
    waited for (and the parser never buffers much more than the limit)."""
    got, closed, took = _exchange(edge.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000)
    _assert_431(got)
    assert closed and took < 3


def test_heads_within_the_limit_are_served_also_on_a_kept_alive_connection(edge):
    ok = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 7000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        s.sendall(ok)
        assert s.recv(65536).startswith(b"HTTP/1.1 503 ")  # /health: no workers yet, but served
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    _assert_431(got)
    # pipelined behind a request still being answered: that answer first, then the 431
    got, closed, _ = _exchange(
        edge.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + ok.replace(b"p" * 7000, b"p" * 9000)
    )
    assert got.startswith(b"HTTP/1.1 503 ") and closed
    _assert_431(got[got.index(b"HTTP/1.1 431") :])


def test_an_oversized_head_never_becomes_a_request(edge):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX-Big: "
        + b"b" * 9000
        + b"\r\n\r\n{}"
    )
    _assert_431(_exchange(edge.port, head)[0])
    got, _, _ = _exchange(edge.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"200 OK" in got.split(b"\r\n", 1)[0]
    assert b'pdmesh_router_requests_total{endpoint="/v1/completions"' not in got  # the app never saw it


def test_max_head_bytes_is_configured_and_reaches_the_server(monkeypatch):
    import pdmesh.router.main as main

    assert RouterConfig().max_head_bytes == 64 * 1024
    monkeypatch.setenv("PDMESH_ROUTER_MAX_HEAD_BYTES", "4096")
    from pdmesh.router.config import load_router_config

    config = load_router_config(cluster_token=TOKEN)
    assert config.max_head_bytes == 4096
    seen: dict = {}
    monkeypatch.setattr(main, "setup_logging", lambda *a: None)
    monkeypatch.setattr(main.uvicorn, "run", lambda app, **kw: seen.update(kw))
    main.run_router(config)
    assert seen["http"].max_head_bytes == 4096


# --- prompts validated: 400, never 500 ----------------------------------------------------------------------


@pytest.fixture
def cache_aware(make_harness):
    """The default choice (cache-aware in both pools, which keys token-id prompts in C int32 arrays)."""
    h = make_harness(policies={"prefill": "cache_aware", "decode": "cache_aware"}, conditional_pd={})
    p = h.add("prefill")
    d = h.add("decode")
    return h, p, d


@pytest.mark.parametrize(
    ("prompt", "where"),
    [
        ([1099511627776], "prompt[0]"),
        ([[], []], "prompt[0]"),
        ([[1, 2], []], "prompt[1]"),
        ([[]], "prompt[0]"),
        ([-1], "prompt[0]"),
        ([5, 2**31], "prompt[1]"),
        ([[1], [2, 2**31]], "prompt[1][1]"),
        ([True], "prompt[0]"),
        ([1.5], "prompt[0]"),
        (["a", 1], "prompt[1]"),
        ([[1], "a"], "prompt[1]"),
        (None, "prompt"),
        ({"a": 1}, "prompt"),
    ],
)
def test_bad_prompts_are_openai_400s_not_500s(cache_aware, prompt, where):
    h, p, d = cache_aware
    r = h.client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 2})
    err = assert_openai_error(r, 400)
    assert err["type"] == "invalid_request_error" and err["param"] == "prompt"
    assert err["code"] == "invalid_request" and err["message"].startswith(where)
    assert p.requests == [] and d.requests == []
    assert h.metric("pdmesh_router_requests_total", status="500") == 0


def test_token_ids_at_the_range_bounds_are_routed(cache_aware):
    h, _, d = cache_aware
    for prompt in ([0, 2**31 - 1], [[0], [2**31 - 1, 7]]):
        r = h.client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 200, r.text
    assert len(d.requests) == 3


def test_check_prompt_accepts_exactly_the_documented_shapes():
    for ok in ("", "text", [0], [1, 2], ["a", ""], [[1], [2, 3]]):
        check_prompt(ok)
    for bad in ([], [[]], [1, [2]], [["a"]], [{}], 3):
        with pytest.raises(OpenAIError) as e:
            check_prompt(bad)
        assert e.value.status == 400 and e.value.param == "prompt"


# --- batched prompts and n admitted per sequence ------------------------------------------------------------


def test_request_parts_counts_prompts_times_n():
    assert request_parts({"prompt": "x"}) == 1
    assert request_parts({"prompt": [1, 2, 3], "n": 2}) == 2  # one token-id prompt
    assert request_parts({"prompt": ["a", "b", "c"], "n": 2}) == 6
    assert request_parts({"prompt": [[1], [2]]}) == 2
    assert request_parts({"messages": [{"role": "user", "content": "x"}], "n": 3}) == 3


def test_limiter_admits_units_grows_and_releases_them_all():
    lim = Limiter(LimitsConfig(max_concurrency=4))
    assert lim.capacity == 4
    p = lim.admit("", 3)
    assert lim.in_flight == 3
    with pytest.raises(OpenAIError) as e:
        lim.admit("", 2)  # 3 + 2 > 4
    assert e.value.status == 429 and e.value.code == "concurrency_limit_exceeded"
    q = lim.admit("")
    with pytest.raises(OpenAIError) as e:
        q.grow(1)  # all or none; q still holds its one unit
    assert e.value.status == 429 and q.units == 1 and lim.in_flight == 4
    p.release()
    q.grow(3)
    assert lim.in_flight == 4
    with pytest.raises(OpenAIError) as e:
        q.grow(1)  # 5 units could never fit: 400, not a 429 to retry forever
    assert e.value.status == 400 and e.value.code == "too_many_parts"
    q.release()
    q.release()
    assert lim.in_flight == 0
    with pytest.raises(OpenAIError) as e:
        lim.admit("", 5)
    assert e.value.status == 400

    class Clock:
        t = 0.0

        def __call__(self) -> float:
            return self.t

    rate = Limiter(LimitsConfig(per_key_rate_per_s=1, per_key_burst=3, rate_per_s=10, burst=2), Clock())
    assert rate.capacity == 2  # the global burst is the smaller bound
    rate.admit("k", 2).release()  # two tokens of each bucket
    with pytest.raises(OpenAIError) as e:
        rate.admit("k", 1)  # the global bucket is empty: the key's token is given back
    assert e.value.code == "rate_limit_exceeded"
    assert rate._keys["k"].bucket.tokens == pytest.approx(1.0)


def test_batched_and_n_requests_hold_one_slot_per_sequence_while_streaming(make_harness):
    h = make_harness(limits={"max_concurrency": 4})
    h.add("prefill")
    d = h.add("decode")
    d.chunk_delay_s = 0.2
    batch = {"model": "m", "prompt": ["a", "b"], "n": 2, "max_tokens": 4, "stream": True}  # 4 sequences
    with h.client.stream("POST", "/v1/completions", json=batch) as held:
        assert held.status_code == 200
        chunks = held.iter_bytes()
        next(chunks)  # the stream is open
        err = assert_openai_error(h.client.post("/v1/completions", json=COMPLETION), 429)
        assert err["code"] == "concurrency_limit_exceeded"
        assert b"[DONE]" in b"".join(chunks)
    assert wait_until(lambda: h.client.post("/v1/completions", json=COMPLETION).status_code == 200)
    # n = 3 on one prompt holds three slots: another request of two sequences does not fit beside it
    with h.client.stream("POST", "/v1/completions", json={**COMPLETION, "n": 3, "stream": True}) as held:
        assert held.status_code == 200
        chunks = held.iter_bytes()
        next(chunks)
        r = h.client.post("/v1/completions", json={**COMPLETION, "prompt": ["x", "y"]})
        assert assert_openai_error(r, 429)["code"] == "concurrency_limit_exceeded"
        assert h.client.post("/v1/completions", json=COMPLETION).status_code == 200  # one more fits
        assert b"[DONE]" in b"".join(chunks)
    assert h.metric("pdmesh_router_requests_total", status="500") == 0


def test_a_request_larger_than_the_limits_can_admit_is_400(make_harness):
    h = make_harness(limits={"max_concurrency": 4})
    h.add("prefill")
    h.add("decode")
    r = h.client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b", "c"], "n": 2})
    err = assert_openai_error(r, 400)
    assert err["code"] == "too_many_parts" and err["param"] == "prompt" and "6 sequences" in err["message"]
    r = h.client.post(
        "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 5}
    )
    assert assert_openai_error(r, 400)["param"] == "n"
    assert (
        h.client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b"], "n": 2}).status_code == 200
    )


def test_max_batch_parts_caps_prompts_times_n(make_harness):
    h = make_harness(max_batch_parts=3)
    h.add("prefill")
    d = h.add("decode")
    for body, param in (
        ({**COMPLETION, "prompt": ["a", "b"], "n": 2}, "prompt"),
        ({**COMPLETION, "prompt": [[1], [2], [3], [4]]}, "prompt"),
        ({**COMPLETION, "n": 4}, "n"),
    ):
        err = assert_openai_error(h.client.post("/v1/completions", json=body), 400)
        assert err["code"] == "too_many_parts" and err["param"] == param and "at most 3" in err["message"]
    assert d.requests == []
    assert h.client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b", "c"]}).status_code == 200
    assert h.client.post("/v1/completions", json={**COMPLETION, "n": 3}).status_code == 200


def test_a_batch_over_the_rate_limit_is_429(make_harness):
    h = make_harness(limits={"per_key_rate_per_s": 0.01, "per_key_burst": 3})
    h.add("prefill")
    h.add("decode")
    assert h.client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b"]}).status_code == 200
    r = h.client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b"]})  # one token left
    assert assert_openai_error(r, 429)["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1


# --- passthrough routes: body timeout and request deadline --------------------------------------------------


def test_passthrough_slow_body_is_408(make_harness):
    h = make_harness(body_timeout_s=0.5)
    h.add("decode")
    with socket.create_connection(("127.0.0.1", h.server.port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": '
        )
        data = b""
        while not data.rstrip().endswith(b"}"):
            part = s.recv(65536)
            if not part:
                break
            data += part
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    err = json.loads(data.partition(b"\r\n\r\n")[2])["error"]
    assert err["code"] == "body_timeout" and err["type"] == "timeout_error"
    assert time.monotonic() - t0 < 3


def test_passthrough_deadline_before_first_byte_is_504(make_harness):
    h = make_harness(request_deadline_s=0.3)
    d = h.add("decode")
    d.delay_s = 3
    t0 = time.monotonic()
    err = assert_openai_error(h.client.post("/v1/responses", json={"model": "m", "input": "hi"}), 504)
    assert err["code"] == "PD_DEADLINE_EXCEEDED"
    assert time.monotonic() - t0 < 2.5
    assert wait_until(lambda: d.cancelled == 1)  # the worker's request was aborted
    assert h.metric("pdmesh_router_errors_total", reason="PD_DEADLINE_EXCEEDED") == 1


def test_passthrough_deadline_mid_stream_ends_with_error_event_and_frees_the_permit(make_harness):
    h = make_harness(request_deadline_s=0.6, limits={"max_concurrency": 1})
    d = h.add("decode")
    d.tokens, d.chunk_delay_s = 50, 0.1
    t0 = time.monotonic()
    with h.client.stream("POST", "/v1/responses", json={"model": "m", "input": "hi", "stream": True}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert time.monotonic() - t0 < 3
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert json.loads(blocks[-1].removeprefix("data: "))["error"]["code"] == "PD_DEADLINE_EXCEEDED"
    deltas = sum("response.output_text.delta" in b for b in blocks)
    assert 1 <= deltas < 50 and "response.completed" not in text
    assert wait_until(lambda: d.cancelled == 1)
    d.tokens, d.chunk_delay_s = 2, 0.0
    assert wait_until(
        lambda: h.client.post("/v1/responses", json={"model": "m", "input": "x"}).status_code == 200
    )
