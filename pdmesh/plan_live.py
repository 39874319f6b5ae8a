"""The planner's inputs from a running cluster: service times and the current load, from live metrics.

``pdmesh plan --from-router URL`` scrapes, every ``interval_s`` for ``window_s``:

- the router's ``GET /internal/workers`` (cluster token) for the workers and their roles, and its ``/metrics`` for
  the load: requests/s (``pdmesh_router_requests_total``), prompt tokens per request
  (``pdmesh_router_prompt_tokens_total``);
- each worker's vLLM ``/metrics`` (the engine's own counters and histograms):
  prefill engines: ``vllm:request_prefill_time_seconds``, ``vllm:prompt_tokens_by_source{source}`` and
  ``vllm:prompt_tokens`` — each interval gives one point (computed tokens, whole-prompt tokens and prefill seconds
  per request); decode engines:
  ``vllm:inter_token_latency_seconds`` and ``vllm:num_requests_running`` — each interval gives one point
  (running requests, mean inter-token latency); ``vllm:generation_tokens`` gives output tokens per request.

:func:`fit_profile` turns the points into a :class:`~pdmesh.planner.WorkerProfile`: for prefill, a least-squares
fit of fixed cost + per computed token + attention per computed token x prompt token (each point carries the
interval's computed and whole-prompt tokens per request, so computed tokens attending to a cached prefix count
against the whole prompt, as :func:`~pdmesh.planner.prefill_seconds` charges them) when 3 or more computed lengths
span 4x or more and no coefficient comes out negative; otherwise a least-squares line through each set of points
when they spread
(computed lengths differing by 1.5x or more, running counts by 2 or more);
otherwise the mean alone with the slope (prefill overhead, per-request decode cost) taken from ``base`` (a
measured profile) or 0, and the result says which (``assumed``). A window with no prefill or no decode work
cannot be fitted: :class:`NotEnoughTraffic` names what was missing.

Blocking (httpx, one client, every call bounded by ``timeout_s``); a worker that does not answer is left out of
that interval, a router that does not answer fails the observation (``httpx.HTTPError``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.planner import WorkerProfile, Workload
from pdmesh.security import TOKEN_HEADER, worker_api_key

GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


class NotEnoughTraffic(ValueError):
    """The window held too little work of one kind to measure it."""


def engine_values(text: str) -> dict[str, float]:
    """What the planner reads from one vLLM ``/metrics`` page, summed over label sets (engines, sources)."""
    out = {
        "prefill_s": 0.0,
        "prefill_n": 0.0,
        "computed_tokens": 0.0,
        "prompt_tokens": 0.0,
        "itl_s": 0.0,
        "itl_n": 0.0,
        "generated": 0.0,
        "running": 0.0,
    }
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = None
            if s.name == "vllm:request_prefill_time_seconds_sum":
                key = "prefill_s"
            elif s.name == "vllm:request_prefill_time_seconds_count":
                key = "prefill_n"
            elif s.name == "vllm:prompt_tokens_by_source_total" and s.labels.get("source") == "local_compute":
                key = "computed_tokens"
            elif s.name == "vllm:prompt_tokens_total":
                key = "prompt_tokens"
            elif s.name == "vllm:inter_token_latency_seconds_sum":
                key = "itl_s"
            elif s.name == "vllm:inter_token_latency_seconds_count":
                key = "itl_n"
            elif s.name == "vllm:generation_tokens_total":
                key = "generated"
            elif s.name == "vllm:num_requests_running":
                key = "running"
            if key is not None:
                out[key] += s.value
    return out


def router_values(text: str) -> dict[str, float]:
    """Completed generation requests (completions and chat) and prompt tokens from one router's ``/metrics`` (all
    processes of a router pod: it merges them)."""
    out = {"requests": 0.0, "prompt_tokens": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if (
                s.name == "pdmesh_router_requests_total"
                and s.labels.get("status") == "200"
                and s.labels.get("endpoint") in GENERATION_ENDPOINTS
            ):
                out["requests"] += s.value
            elif s.name == "pdmesh_router_prompt_tokens_total":
                out["prompt_tokens"] += s.value
    return out


@dataclass
class Points:
    """One point per worker and interval: prefill (tokens computed per request, prompt tokens per request, seconds
    per request; a mean over the interval's prompts, so the attention regressor is exact when they are alike), decode
    (running, inter-token seconds), load (prompt tokens per request, seconds per request that a decode engine
    spends before a request's first token: taking in its pushed KV)."""

    prefill: list[tuple[float, float, float]] = field(default_factory=list)  # (computed, prompt, seconds)
    decode: list[tuple[float, float]] = field(default_factory=list)
    load: list[tuple[float, float]] = field(default_factory=list)

    def add_interval(
        self, role: str, before: dict[str, float], after: dict[str, float], seconds: float | None = None
    ) -> None:
        """``seconds``: the interval's length. Prompts prefilled together each count the whole batched step; an
        engine cannot have been busy longer than the interval, so their summed time is capped at it."""
        d = {k: after[k] - before[k] for k in before}
        if role in ("prefill", "both") and d["prefill_n"] >= 1 and d["computed_tokens"] > 0:
            busy = d["prefill_s"] if seconds is None else min(d["prefill_s"], seconds)
            computed = d["computed_tokens"] / d["prefill_n"]
            prompt = max(
                d["prompt_tokens"] / d["prefill_n"], computed
            )  # an engine without the counter: fresh
            self.prefill.append((computed, prompt, busy / d["prefill_n"]))
        if role == "decode" and d["prefill_n"] >= 1 and d["prompt_tokens"] > 0:
            self.load.append((d["prompt_tokens"] / d["prefill_n"], d["prefill_s"] / d["prefill_n"]))
        if role in ("decode", "both") and d["itl_n"] >= 1:
            running = (before["running"] + after["running"]) / 2
            self.decode.append((max(running, 1.0), d["itl_s"] / d["itl_n"]))


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def _attention_fit(points: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b*c + k*c*p`` over (computed c, prompt p, seconds y) points: (a, b, k); the normal
    equations solved by Cramer's rule. With fresh prompts (p = c) this is the parabola through the points."""
    rows = [(1.0, c, c * p, y) for c, p, y in points]
    m = [[sum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
    rhs = [sum(r[i] * r[3] for r in rows) for i in range(3)]

    def det(a: list[list[float]]) -> float:
        return (
            a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
        )

    d = det(m)
    # nearly collinear regressors (every prompt about as long, only the hits varying: computed x prompt is then
    # computed times a constant) split the time between per-token and attention at random: unfitted
    if abs(d) < 1e-4 * m[0][0] * m[1][1] * m[2][2]:
        return 0.0, -1.0, 0.0
    out = []
    for col in range(3):
        mc = [[rhs[i] if j == col else m[i][j] for j in range(3)] for i in range(3)]
        out.append(det(mc) / d)
    return out[0], out[1], out[2]


def _load_line(
    points: list[tuple[float, float]], base: WorkerProfile | None, assumed: list[str]
) -> tuple[float, float]:
    """(fixed, per token) KV-load cost on a decode engine; from ``base`` (or 0) when the window had no PD load."""
    if not points:
        assumed.append("decode_load_s")
        return (base.decode_load_s, base.decode_load_per_token_s) if base else (0.0, 0.0)
    xs = [x for x, _ in points]
    if len(points) >= 2 and max(xs) >= 1.5 * min(xs):
        fixed, per_token = _line(points)
        if fixed >= 0 and per_token >= 0:
            return fixed, per_token
    return statistics.fmean(y for _, y in points), 0.0


@dataclass(frozen=True)
class FittedProfile:
    profile: WorkerProfile
    assumed: tuple[str, ...]  # fields not measured in the window (taken from the base profile, or 0)
    prefill_points: int
    decode_points: int


def fit_profile(points: Points, base: WorkerProfile | None = None) -> FittedProfile:
    """Service times from the points (see the module docstring); raises :class:`NotEnoughTraffic`."""
    if not points.prefill:
        raise NotEnoughTraffic("no prefill finished on a prefill engine in the window")
    if not points.decode:
        raise NotEnoughTraffic("no token was generated on a decode engine in the window")
    assumed: list[str] = []
    xs = [c for c, _, _ in points.prefill]
    overhead, per_token, attention = 0.0, -1.0, 0.0  # unfitted
    if len({round(x) for x in xs}) >= 3 and max(xs) >= 4 * min(xs):
        overhead, per_token, attention = _attention_fit(points.prefill)
        if min(overhead, per_token, attention) < 0:
            overhead, per_token, attention = 0.0, -1.0, 0.0
    if per_token <= 0 and len(points.prefill) >= 2 and max(xs) >= 1.5 * min(xs):
        attention = 0.0
        overhead, per_token = _line([(c, y) for c, _, y in points.prefill])
    if per_token <= 0 or overhead < 0:  # no spread, or a line the noise tilted: the mean, overhead from base
        attention = 0.0
        overhead = base.prefill_overhead_s if base else 0.0
        tokens = sum(xs)
        secs = sum(y for _, _, y in points.prefill) - overhead * len(points.prefill)
        per_token = max(secs, 1e-9) / tokens
        assumed.append("prefill_overhead_s")
    ns = [n for n, _ in points.decode]
    step, per_seq = 0.0, -1.0  # unfitted
    if len(points.decode) >= 2 and max(ns) - min(ns) >= 2:
        step, per_seq = _line(points.decode)
    if per_seq < 0 or step <= 0:
        per_seq = base.decode_step_per_seq_s if base else 0.0
        step = statistics.fmean(itl - per_seq * n for n, itl in points.decode)
        assumed.append("decode_step_per_seq_s")
    load_fixed, load_per_token = _load_line(points.load, base, assumed)
    profile = WorkerProfile(
        prefill_tokens_per_s=1.0 / per_token,
        prefill_overhead_s=overhead,
        decode_step_s=max(step, 1e-5),
        decode_step_per_seq_s=max(per_seq, 0.0),
        transfer_s=base.transfer_s if base else 0.0,
        decode_load_s=load_fixed,
        decode_load_per_token_s=load_per_token,
        host_cpu_per_request_s=base.host_cpu_per_request_s if base else 0.0,  # not in the engines' metrics
        prefill_attention_s_per_token2=attention,
    )
    return FittedProfile(profile, tuple(assumed), len(points.prefill), len(points.decode))


@dataclass(frozen=True)
class Observation:
    fitted: FittedProfile
    workload: Workload  # the load seen in the window (rate, prompt/output tokens per request, hit rate)
    workers: dict[str, int]  # role -> workers scraped
    window_s: float


class ClusterUnreachable(RuntimeError):
    """No router, or no worker's engine, answered (the message says which and what to check)."""


def _router_addresses(url: str) -> list[str]:
    """Every router process behind ``url`` (a headless Service name: one per pod), as the workers see them."""
    import asyncio

    from pdmesh.worker.heartbeat import RouterTargets

    return asyncio.run(RouterTargets(url).current())


class ClusterScraper:
    """Snapshots of a running cluster's metrics: every router behind the URL (their counters summed: each counts
    the requests it routed) and every registered, healthy worker's engine."""

    def __init__(self, router_url: str, token: str, timeout_s: float = 5.0) -> None:
        self.routers = _router_addresses(router_url)
        self.token = token
        headers = {TOKEN_HEADER: token} if token else {}
        self.client = httpx.Client(timeout=timeout_s, trust_env=False, headers=headers)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> ClusterScraper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def workers(self) -> dict[str, str]:
        """Healthy workers' vLLM base URL -> role (from the first router that answers)."""
        error: Exception | None = None
        for router in self.routers:
            try:
                r = self.client.get(router + "/internal/workers")
                r.raise_for_status()
                return {str(w["url"]).rstrip("/"): str(w["role"]) for w in r.json() if w.get("healthy")}
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                error = e
        raise ClusterUnreachable(f"no router at {', '.join(self.routers)} listed its workers: {error}")

    def snapshot(self, workers: dict[str, str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """(router values summed over the routers, {worker URL: engine values}); workers that do not answer are
        missing; a router that does not answer raises :class:`ClusterUnreachable` (its counts would be lost)."""
        totals = {"requests": 0.0, "prompt_tokens": 0.0}
        for router in self.routers:
            try:
                r = self.client.get(router + "/metrics")
                r.raise_for_status()
                values = router_values(r.text)
            except (httpx.HTTPError, ValueError) as e:
                raise ClusterUnreachable(f"router {router} /metrics: {e}") from None
            for k in totals:
                totals[k] += values[k]
        engines: dict[str, dict[str, float]] = {}
        auth = {"Authorization": f"Bearer {worker_api_key(self.token)}"} if self.token else {}
        for url in workers:
            try:
                w = self.client.get(url + "/metrics", headers=auth)
                w.raise_for_status()
                engines[url] = engine_values(w.text)
            except (httpx.HTTPError, ValueError):
                continue
        return totals, engines

    def observe(
        self, window_s: float, interval_s: float = 2.0, base: WorkerProfile | None = None, sleep=time.sleep
    ) -> Observation:
        """Scrape for ``window_s`` (blocking) and fit; raises :class:`NotEnoughTraffic` on an idle window and
        :class:`ClusterUnreachable` when no engine answers (worker addresses unreachable from here).

        Totals are sums of per-interval deltas (a worker missing from one scrape loses one interval, an engine
        restart's counter reset is skipped). Under live traffic the decode engines' KV loads are inside the
        measured inter-token latency, so the separate load term is not fitted here (``base`` gives it, else 0)."""
        workers = self.workers()
        if not workers:
            raise NotEnoughTraffic("the router lists no healthy worker")
        points = Points()
        t0 = time.monotonic()
        router_prev, prev = self.snapshot(workers)
        if not prev:
            raise ClusterUnreachable(
                f"no worker's /metrics answered ({', '.join(workers)}): run `pdmesh plan` where the workers' "
                "addresses are reachable (inside the cluster)"
            )
        totals = {"requests": 0.0, "prompt_tokens": 0.0, "generated": 0.0, "computed": 0.0}
        t_prev = t0
        while time.monotonic() - t0 < window_s:
            sleep(interval_s)
            router_now, now = self.snapshot(workers)
            t_now = time.monotonic()
            for k in ("requests", "prompt_tokens"):
                totals[k] += max(0.0, router_now[k] - router_prev[k])
            for url, after in now.items():
                before = prev.get(url)
                if before is None or any(after[k] < before[k] for k in ("prefill_n", "itl_n", "generated")):
                    continue  # missing last time, or restarted (counters reset)
                points.add_interval(workers[url], before, after, t_now - t_prev)
                if workers[url] in ("decode", "both"):  # a prefill leg's one token is not output
                    totals["generated"] += after["generated"] - before["generated"]
                totals["computed"] += after["computed_tokens"] - before["computed_tokens"]
            router_prev, prev, t_prev = router_now, now, t_now
        elapsed = max(time.monotonic() - t0, 1e-6)
        points.load.clear()
        fitted = fit_profile(points, base)
        requests = totals["requests"]
        if requests < 1:
            raise NotEnoughTraffic("the router completed no request in the window")
        prompt = totals["prompt_tokens"] / requests
        output = max(1.0, totals["generated"] / requests)
        hit = min(max(1.0 - totals["computed"] / (prompt * requests), 0.0), 0.99) if prompt > 0 else 0.0
        roles: dict[str, int] = {}
        for role in workers.values():
            roles[role] = roles.get(role, 0) + 1
        return Observation(fitted, Workload(requests / elapsed, prompt, output, hit), roles, elapsed)
