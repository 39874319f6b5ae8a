"""``pdmesh plan``: how many prefill and decode workers a load needs, and the TTFT/ITL to expect.

The model (one worker's measured service times, :class:`WorkerProfile`):

- a prefill worker serves one prompt at a time (FIFO, as a saturated CPU engine does): service time
  ``prefill_overhead_s + uncached / prefill_tokens_per_s + prefill_attention_s_per_token2 * uncached * prompt``
  (the last term: each computed token attends to the whole prompt, which grows with the square of its length
  and dominates long prompts); the pool of ``P`` workers is an M/G/P queue
  (Poisson arrivals), its wait from the Allen-Cunneen approximation with the Erlang-C probability of waiting and an
  exponential tail for the p90;
- a decode worker runs all its requests in one batch: a step takes ``decode_step_s + decode_step_per_seq_s * n``
  for ``n`` running requests and gives each one token (ITL = step time), plus, for each request joining in that
  step, the load of its pushed KV (``L = decode_load_s + decode_load_per_token_s * prompt tokens``); with ``lam``
  requests/s of ``O`` output tokens per worker, a step holds ``lam*step`` joiners and Little's law gives
  ``n = lam * O * step``, so ``step = s0 / (1 - lam*L - lam*O*s1)`` (stable while ``lam*(L + O*s1) < 1``);
  decoders of different speeds (shared cores) hold equal batches (the router picks the fewest running), the
  faster ones taking more requests;
- ``cores``: when workers share fewer cores than there are workers (one small machine), each engine is pinned to
  one core as ``pdmesh up`` does (:mod:`pdmesh.placement`: prefill workers on cores of their own first, decode
  workers sharing the rest); a worker whose core holds
  ``k`` engines has its service times stretched ``k`` times (compute-bound engines share a core evenly). The
  prefill pool then has servers of different speeds: its capacity is the sum of their rates and the queueing
  formulas use the equivalent equal servers; the decode pool is as fast as its slowest worker.

TTFT = prefill wait + prefill service + ``transfer_s`` (push and decode start) + one decode step.
:func:`plan` returns the cheapest (fewest workers, then fewer prefill workers) configuration whose predicted
TTFT p90 and ITL meet the SLOs, with its predictions. :mod:`pdmesh.plan_sim` simulates the same pools event by
event; the tests check the formulas against it, ``bench/bench_planner.py`` against real ``pdmesh up`` runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from pdmesh.placement import core_plan


@dataclass(frozen=True)
class WorkerProfile:
    """One worker's service times on its hardware (``bench/bench_planner.py --measure`` writes them)."""

    prefill_tokens_per_s: float
    prefill_overhead_s: float
    decode_step_s: float  # a decode step with (almost) nothing in the batch
    decode_step_per_seq_s: float  # what each running request adds to a step
    transfer_s: float = 0.0  # push + decode start, per request
    decode_load_s: float = 0.0  # what a decode engine spends per request taking in its pushed KV (fixed part)
    decode_load_per_token_s: float = 0.0  # ... and per prompt token
    # CPU seconds per request of everything besides the engines' model compute (router, API servers, engine
    # schedulers, tiers, agents): counted only when workers share ``cores`` with it (one machine)
    host_cpu_per_request_s: float = 0.0
    # attention: seconds per (computed token x prompt token), the part of a prefill that grows with the square
    # of the prompt's length
    prefill_attention_s_per_token2: float = 0.0

    @classmethod
    def load(cls, path: str | Path) -> WorkerProfile:
        data = json.loads(Path(path).read_text())
        data = data.get("profile", data)
        profile = cls(**{k: float(data[k]) for k in cls.__dataclass_fields__ if k in data})
        if profile.prefill_tokens_per_s <= 0 or profile.decode_step_s <= 0:
            raise ValueError("prefill_tokens_per_s and decode_step_s must be positive")
        if min(profile.prefill_overhead_s, profile.decode_step_per_seq_s, profile.transfer_s,
               profile.decode_load_s, profile.decode_load_per_token_s, profile.host_cpu_per_request_s,
               profile.prefill_attention_s_per_token2) < 0:  # fmt: skip
            raise ValueError("service times cannot be negative")
        return profile


@dataclass(frozen=True)
class Workload:
    rate: float  # requests/s, Poisson
    prompt_tokens: float
    output_tokens: float
    hit_rate: float = 0.0  # share of the prompt already cached (not computed)
    prompt_cv2: float = 0.0  # squared coefficient of variation of the uncached prompt length

    @property
    def uncached_tokens(self) -> float:
        return self.prompt_tokens * (1.0 - self.hit_rate)


@dataclass(frozen=True)
class Prediction:
    prefill: int
    decode: int
    stable: bool
    max_rate: float  # requests/s the pools can sustain (the lower of the two pools' capacities)
    prefill_utilization: float
    ttft_p50_s: float
    ttft_p90_s: float
    itl_s: float
    decode_batch: float  # running requests per decode worker

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ServiceTimes:
    """The times one configuration's workers take (stretched where engines share a core)."""

    prefill_s: tuple[float, ...]  # one prompt, per prefill worker
    step_s: tuple[float, ...]  # a decode step with nothing in the batch, per decode worker
    step_per_seq_s: tuple[float, ...]  # what each running request adds to a step, per decode worker
    load_s: tuple[float, ...]  # what each request joining a step adds to it (its KV load), per decode worker
    transfer_s: float

    @property
    def prefill_equivalent_s(self) -> float:
        """The service time of equal servers with the pool's total rate."""
        return len(self.prefill_s) / sum(1.0 / s for s in self.prefill_s)


def core_sharing(prefill: int, decode: int, cores: float | None) -> tuple[list[int], list[int]]:
    """Engines on each worker's core, placed as ``pdmesh up`` pins them (:func:`pdmesh.placement.core_plan`);
    1 each without ``cores`` (every worker on its own hardware) or when there are enough cores."""
    if not cores or prefill + decode <= cores:
        return [1] * prefill, [1] * decode
    p_cores, d_cores = core_plan(prefill, decode, max(1, int(cores)))
    on = p_cores + d_cores
    return [on.count(c) for c in p_cores], [on.count(c) for c in d_cores]


def prefill_seconds(profile: WorkerProfile, computed_tokens: float, prompt_tokens: float) -> float:
    """One prefill worker's time for a prompt of ``prompt_tokens`` of which ``computed_tokens`` are not cached."""
    return (
        profile.prefill_overhead_s
        + computed_tokens / profile.prefill_tokens_per_s
        + profile.prefill_attention_s_per_token2 * computed_tokens * prompt_tokens
    )


def service_times(
    profile: WorkerProfile, w: Workload, prefill: int, decode: int, cores: float | None
) -> ServiceTimes:
    """The one place the model's service times are derived (the planner and the event model both use it).

    With ``cores``, besides the placement, the host's work at ``w.rate`` (``host_cpu_per_request_s`` each) takes
    its share of every core: the engines keep ``a = 1 - host * rate / cores`` of them (at least 5%)."""
    p_share, d_share = core_sharing(prefill, decode, cores)
    if cores and profile.host_cpu_per_request_s:
        a = max(0.05, 1.0 - profile.host_cpu_per_request_s * w.rate / cores)
        p_share, d_share = [k / a for k in p_share], [k / a for k in d_share]
    s_p = prefill_seconds(profile, w.uncached_tokens, w.prompt_tokens)
    return ServiceTimes(
        tuple(k * s_p for k in p_share),
        tuple(k * profile.decode_step_s for k in d_share),
        tuple(k * profile.decode_step_per_seq_s for k in d_share),
        tuple(
            k * (profile.decode_load_s + profile.decode_load_per_token_s * w.prompt_tokens) for k in d_share
        ),
        profile.transfer_s,
    )


def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival waits in an M/M/``servers`` queue with offered load ``load`` (= lambda/mu)."""
    if load >= servers:
        return 1.0
    term, total = 1.0, 1.0
    for k in range(1, servers):
        term *= load / k
        total += term
    term *= load / servers
    last = term * servers / (servers - load)
    return last / (total + last)


def predict(
    profile: WorkerProfile, w: Workload, prefill: int, decode: int, cores: float | None = None
) -> Prediction:
    t = service_times(profile, w, prefill, decode, cores)
    s_p = t.prefill_equivalent_s
    decode_cap = _decode_capacity(t, w.output_tokens)
    max_rate = capacity(profile, w, prefill, decode, cores)
    rho = w.rate * s_p / prefill
    stable = rho < 1.0 and w.rate < decode_cap
    if not stable:
        return Prediction(prefill, decode, False, max_rate, rho, math.inf, math.inf, math.inf, math.inf)
    n = _decode_batch(t, w.output_tokens, w.rate)
    itl = (
        decode * n / (w.output_tokens * w.rate)
    )  # request-weighted mean step: each decoder has lam_j*step_j = n/O
    # M/G/c wait: Erlang-C probability of waiting, mean wait scaled by (ca^2 + cs^2) / 2, exponential tail
    pw = erlang_c(prefill, w.rate * s_p)
    variability = (1.0 + w.prompt_cv2) / 2.0
    drain = prefill / s_p - w.rate  # requests/s the pool clears beyond the arrivals
    decay = drain / variability

    def wait_quantile(q: float) -> float:
        return 0.0 if pw <= 1.0 - q else math.log(pw / (1.0 - q)) / decay

    base = s_p + t.transfer_s + itl
    return Prediction(
        prefill, decode, True, max_rate, rho, base + wait_quantile(0.5), base + wait_quantile(0.9), itl, n
    )


def _decode_capacity(t: ServiceTimes, out: float) -> float:
    return sum(
        1.0 / c if (c := out * s1 + load) > 0 else math.inf
        for s1, load in zip(t.step_per_seq_s, t.load_s, strict=True)
    )


def capacity(
    profile: WorkerProfile, w: Workload, prefill: int, decode: int, cores: float | None = None
) -> float:
    """Requests/s the configuration sustains: the lower of the pools' capacities ``C``; on shared ``cores``,
    reduced by the host's work at that rate: ``X = C * (1 - host * X / cores)``, i.e. ``C / (1 + host * C / cores)``."""
    t = service_times(profile, dataclasses.replace(w, rate=0.0), prefill, decode, cores)
    pools = min(prefill / t.prefill_equivalent_s, _decode_capacity(t, w.output_tokens))
    if not cores or not profile.host_cpu_per_request_s:
        return pools
    host = profile.host_cpu_per_request_s
    single = service_times(profile, w, 1, 1, None)
    cpu_per_request = (
        single.prefill_s[0] + w.output_tokens * single.step_per_seq_s[0] + single.load_s[0] + host
    )
    return min(pools / (1.0 + host * pools / cores), cores / cpu_per_request)


def _decode_batch(t: ServiceTimes, out: float, rate: float) -> float:
    """Running requests per decode worker at ``rate``. Choosing the decoder with the fewest running requests keeps
    ``n`` equal across decoders; decoder ``j`` then steps in ``s0_j + n * (s1_j + L_j / out)`` (its joiners' loads
    included) and takes ``n / (out * step_j)`` requests/s; ``n`` is where those rates add up to ``rate``
    (bisection: the sum grows with ``n``)."""

    def total(n: float) -> float:
        return sum(
            n / (out * (s0 + n * (s1 + load / out)))
            for s0, s1, load in zip(t.step_s, t.step_per_seq_s, t.load_s, strict=True)
        )

    lo, hi = 0.0, 1.0
    while total(hi) < rate:
        hi *= 2
        if hi > 1e9:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < rate else (lo, mid)
    return (lo + hi) / 2


def plan(
    profile: WorkerProfile,
    w: Workload,
    ttft_slo_s: float,
    itl_slo_s: float,
    max_workers: int = 64,
    cores: float | None = None,
) -> Prediction | None:
    """The configuration with the fewest workers (then the fewest prefill workers) meeting both SLOs, or None."""
    for total in range(2, max_workers + 1):
        for p in range(1, total):
            pred = predict(profile, w, p, total - p, cores)
            if pred.stable and pred.ttft_p90_s <= ttft_slo_s and pred.itl_s <= itl_slo_s:
                return pred
    return None
