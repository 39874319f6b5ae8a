"""``pdmesh plan``: how many prefill and decode workers a load needs, and the TTFT/ITL to expect.

The model (one worker's measured service times, :class:`WorkerProfile`):

- a prefill worker serves one prompt at a time (FIFO, as a saturated CPU engine does): service time
  ``prefill_overhead_s + uncached_tokens / prefill_tokens_per_s``; the pool of ``P`` workers is an M/G/P queue
  (Poisson arrivals), its wait from the Allen-Cunneen approximation with the Erlang-C probability of waiting and an
  exponential tail for the p90;
- a decode worker runs all its requests in one batch: a step takes ``decode_step_s + decode_step_per_seq_s * n``
  for ``n`` running requests and gives each one token (ITL = step time); with ``lam`` requests/s of ``O`` output
  tokens per worker, Little's law gives ``n = lam * O * step(n)``, i.e. ``n = lam*O*s0 / (1 - lam*O*s1)``
  (stable while ``lam*O*s1 < 1``);
- ``cores``: when workers share fewer cores than there are workers (a small machine), every service time is
  stretched by ``workers / cores`` (each compute-bound engine gets its share of the cores).

TTFT = prefill wait + prefill service + ``transfer_s`` (push and decode start) + one decode step.
:func:`plan` returns the cheapest (fewest workers, then fewer prefill workers) configuration whose predicted
TTFT p90 and ITL meet the SLOs, with its predictions. :mod:`pdmesh.plan_sim` simulates the same pools event by
event; the tests check the formulas against it, ``bench/bench_planner.py`` against real ``pdmesh up`` runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerProfile:
    """One worker's service times on its hardware (``bench/bench_planner.py --measure`` writes them)."""

    prefill_tokens_per_s: float
    prefill_overhead_s: float
    decode_step_s: float  # a decode step with (almost) nothing in the batch
    decode_step_per_seq_s: float  # what each running request adds to a step
    transfer_s: float = 0.0  # push + decode start, per request

    @classmethod
    def load(cls, path: str | Path) -> WorkerProfile:
        data = json.loads(Path(path).read_text())
        data = data.get("profile", data)
        profile = cls(**{k: float(data[k]) for k in cls.__dataclass_fields__ if k in data})
        if profile.prefill_tokens_per_s <= 0 or profile.decode_step_s <= 0:
            raise ValueError("prefill_tokens_per_s and decode_step_s must be positive")
        if min(profile.prefill_overhead_s, profile.decode_step_per_seq_s, profile.transfer_s) < 0:
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
    """The times one configuration's workers take (stretched when they share fewer cores than there are)."""

    prefill_s: float  # one prompt on a prefill worker
    step_s: float  # a decode step with nothing in the batch
    step_per_seq_s: float  # what each running request adds to a step
    transfer_s: float


def service_times(
    profile: WorkerProfile, w: Workload, prefill: int, decode: int, cores: float | None
) -> ServiceTimes:
    """The one place the model's service times are derived (the planner and the event model both use it)."""
    slow = max(1.0, (prefill + decode) / cores) if cores else 1.0
    return ServiceTimes(
        slow * (profile.prefill_overhead_s + w.uncached_tokens / profile.prefill_tokens_per_s),
        slow * profile.decode_step_s,
        slow * profile.decode_step_per_seq_s,
        slow * profile.transfer_s,
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
    s_p, s0, s1 = t.prefill_s, t.step_s, t.step_per_seq_s
    prefill_cap = prefill / s_p
    decode_cap = decode / (w.output_tokens * s1) if s1 > 0 else math.inf
    max_rate = min(prefill_cap, decode_cap)
    rho = w.rate * s_p / prefill
    lam_d = w.rate / decode
    stable = rho < 1.0 and lam_d * w.output_tokens * s1 < 1.0
    if not stable:
        return Prediction(prefill, decode, False, max_rate, rho, math.inf, math.inf, math.inf, math.inf)
    n = lam_d * w.output_tokens * s0 / (1.0 - lam_d * w.output_tokens * s1)
    itl = s0 + s1 * n
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
