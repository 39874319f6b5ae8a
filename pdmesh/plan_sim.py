"""A discrete-event model of the prefill and decode pools, to check :mod:`pdmesh.planner`'s formulas.

Same assumptions as the planner, simulated request by request instead of solved: Poisson arrivals; the router
sends each prompt to the prefill worker with the fewest requests (queued + running), which serves one at a time;
then (after ``transfer_s``) to the decode worker with the fewest running requests, which advances all its
requests one token per step of ``decode_step_s + decode_step_per_seq_s * running`` plus the KV load of the
requests joining in that step; a request joining a busy worker waits for the next step. Service times are per worker, stretched where engines share a core, as in the
planner (:func:`pdmesh.planner.service_times`).
Pure Python, deterministic for a seed, no wall clock.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import statistics
from dataclasses import dataclass, field

from pdmesh.planner import WorkerProfile, Workload, capacity, service_times


@dataclass
class SimResult:
    completed: int
    duration_s: float
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.completed / self.duration_s

    def quantile(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict:
        return {
            "completed": self.completed,
            "throughput": self.throughput,
            "ttft_p50_s": self.quantile(self.ttft_s, 0.5),
            "ttft_p90_s": self.quantile(self.ttft_s, 0.9),
            "itl_mean_s": statistics.fmean(self.itl_s),
        }


@dataclass
class _Decoder:
    running: dict[int, int] = field(default_factory=dict)  # request -> tokens still to generate
    stepping: bool = False
    batch: list[int] = field(default_factory=list)  # the requests of the step in progress
    joined: set[int] = field(default_factory=set)  # requests that have not been in a step yet (KV to load)

    def next_step(self, s0: float, s1: float, load: float) -> float:
        """Start a step over every running request; its duration (newcomers' KV loads included)."""
        self.batch = list(self.running)
        new = len(self.joined)
        self.joined.clear()
        return s0 + s1 * len(self.batch) + load * new


def simulate(
    profile: WorkerProfile,
    w: Workload,
    prefill: int,
    decode: int,
    requests: int = 4000,
    cores: float | None = None,
    seed: int = 0,
    closed_loop: int | None = None,
) -> SimResult:
    """Simulate ``requests`` requests (the first 10% to finish are warm-up: measured is what finishes after). ``closed_loop``: instead of
    Poisson arrivals, that many clients each sending the next request when the previous one finishes (how a
    saturating benchmark measures throughput)."""
    rng = random.Random(seed)
    times = service_times(profile, w, prefill, decode, cores)
    s0, s1, load = times.step_s, times.step_per_seq_s, times.load_s
    out_tokens = max(1, round(w.output_tokens))
    events: list[tuple[float, int, str, int, int]] = []  # (time, seq, kind, request or worker, worker)
    seq = 0

    def push(t: float, kind: str, a: int, b: int = 0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, a, b))

    p_queue: list[list[int]] = [[] for _ in range(prefill)]
    p_busy = [False] * prefill
    decoders = [_Decoder() for _ in range(decode)]
    arrived: dict[int, float] = {}
    first_token: dict[int, float] = {}
    last_token: dict[int, float] = {}
    warmup = requests // 10
    result = SimResult(0, 0.0)
    sent = 0
    finished = 0
    t_measure_start = None

    def send(t: float) -> None:
        nonlocal sent
        if sent < requests:
            push(t, "arrive", sent)
            sent += 1

    def service(worker: int, jitter_cv2: float) -> float:
        s_p = times.prefill_s[worker]
        if jitter_cv2 <= 0:
            return s_p
        shape = 1.0 / jitter_cv2  # gamma with the requested squared coefficient of variation
        return rng.gammavariate(shape, s_p / shape)

    if closed_loop:
        for _ in range(closed_loop):
            send(0.0)
    else:
        t = 0.0
        for _ in range(requests):
            t += rng.expovariate(w.rate)
            push(t, "arrive", sent)
            sent += 1
    end = 0.0
    while events:
        t, _, kind, a, b = heapq.heappop(events)
        end = t
        if kind == "arrive":
            arrived[a] = t
            i = min(range(prefill), key=lambda k: len(p_queue[k]) + p_busy[k])
            p_queue[i].append(a)
            if not p_busy[i]:
                p_busy[i] = True
                push(t + service(i, w.prompt_cv2), "prefilled", p_queue[i].pop(0), i)
        elif kind == "prefilled":
            if p_queue[b]:
                push(t + service(b, w.prompt_cv2), "prefilled", p_queue[b].pop(0), b)
            else:
                p_busy[b] = False
            push(t + times.transfer_s, "to_decode", a)
        elif kind == "to_decode":
            j = min(range(decode), key=lambda k: len(decoders[k].running))
            d = decoders[j]
            d.running[a] = out_tokens
            d.joined.add(a)
            if not d.stepping:  # a request joining a busy worker waits for the next step
                d.stepping = True
                push(t + d.next_step(s0[j], s1[j], load[j]), "step", j)
        elif kind == "step":
            d = decoders[a]
            for r in d.batch:
                if r not in first_token:
                    first_token[r] = t
                last_token[r] = t
                d.running[r] -= 1
                if d.running[r] == 0:
                    del d.running[r]
                    finished += 1
                    if finished == warmup:
                        t_measure_start = t
                    elif finished > warmup:
                        result.completed += 1
                        result.ttft_s.append(first_token[r] - arrived[r])
                        if out_tokens > 1:
                            result.itl_s.append((last_token[r] - first_token[r]) / (out_tokens - 1))
                    if closed_loop:
                        send(t)
            if d.running:
                push(t + d.next_step(s0[a], s1[a], load[a]), "step", a)
            else:
                d.stepping = False
    result.duration_s = end - (t_measure_start or 0.0)
    if not result.itl_s:
        result.itl_s = [s0[0] + s1[0]]
    return result


def closed_loop_throughput(
    profile: WorkerProfile,
    w: Workload,
    prefill: int,
    decode: int,
    clients: int,
    cores: float | None = None,
    requests: int = 3000,
    seed: int = 1,
) -> float:
    """Requests/s that ``clients`` clients sending back to back get (how a saturating benchmark measures): unlike
    :func:`pdmesh.planner.capacity` (open arrivals, batches as large as the load makes them), the clients bound
    the decode batches, so a step's fixed cost is shared by at most that many requests. On shared ``cores`` the
    host's share depends on the rate: the rate is iterated to a fixed point (4 simulations at most)."""
    rate = capacity(profile, w, prefill, decode, cores)
    for _ in range(4 if cores and profile.host_cpu_per_request_s else 1):
        at = dataclasses.replace(w, rate=rate)
        got = simulate(profile, at, prefill, decode, requests, cores, seed, closed_loop=clients).throughput
        if abs(got - rate) <= 0.01 * rate:
            return got
        rate = got
    return rate
