"""Soft-state registry of workers from three sources: self-registration (heartbeats), static config, DNS.

Invariants: a worker is *healthy* when it is live (registered workers: last heartbeat younger than ``ttl_s``;
static/DNS workers: their last active health check passed), and its circuit breaker is not open. Expired
registered workers are removed by :meth:`Registry.expire`, called periodically by the app; static and DNS
workers are added and removed by their discovery source. All methods are synchronous and cheap; they run on
the router's event loop (no locking needed: single-threaded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from pdmesh.breaker import CircuitBreaker
from pdmesh.router.registration import WorkerRegistration

Source = Literal["registered", "static", "dns"]


@dataclass
class Worker:
    info: WorkerRegistration
    last_seen: float
    breaker: CircuitBreaker
    source: Source = "registered"
    # Active health checks (static/DNS workers): False after ``unhealthy_after`` failed checks.
    probe_ok: bool = True
    probe_failures: int = 0
    probe_successes: int = 0
    in_flight: int = 0
    pd_pending: int = 0  # PD requests choosing this decoder whose legs are not done (router.legs.pd_pending)
    registered_at: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return self.info.worker_id

    @property
    def url(self) -> str:
        return self.info.url

    @property
    def failed_until(self) -> float:
        return self.breaker.opened_until

    @property
    def consecutive_failures(self) -> int:
        return self.breaker.consecutive_failures

    def serves(self, role: str, model: str | None) -> bool:
        return (self.info.role == role or self.info.role == "both") and (
            model is None or model in self.info.models
        )


@dataclass
class BreakerSettings:
    failures: int = 1
    open_s: float = 5.0
    max_open_s: float = 60.0


class Registry:
    def __init__(
        self,
        ttl_s: float,
        failure_cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        breaker: BreakerSettings | None = None,
    ):
        self.ttl_s = ttl_s
        self.failure_cooldown_s = failure_cooldown_s
        self._clock = clock
        self._breaker = breaker or BreakerSettings(open_s=failure_cooldown_s)
        self._workers: dict[str, Worker] = {}

    def _new(self, info: WorkerRegistration, source: Source) -> Worker:
        b = self._breaker
        breaker = CircuitBreaker(b.failures, b.open_s, b.max_open_s, clock=self._clock)
        return Worker(info=info, last_seen=self._clock(), breaker=breaker, source=source)

    def upsert(self, info: WorkerRegistration, source: Source = "registered") -> Worker:
        """Register or refresh a worker. A changed URL/role replaces the entry (a restarted worker)."""
        w = self._workers.get(info.worker_id)
        if w is None or w.info.url != info.url or w.info.role != info.role or w.source != source:
            w = self._new(info, source)
            self._workers[info.worker_id] = w
        else:
            w.info = info
            w.last_seen = self._clock()
        return w

    def remove(self, worker_id: str) -> bool:
        return self._workers.pop(worker_id, None) is not None

    def sync_source(self, source: Source, infos: Iterable[WorkerRegistration], scope: str = "") -> list[str]:
        """Make the workers of ``source`` whose id starts with ``scope`` exactly ``infos``; returns removed ids.

        New workers start unprobed-healthy (``probe_ok``); the health checker corrects that within an interval.
        """
        wanted = {i.worker_id: i for i in infos}
        gone = [
            wid
            for wid, w in self._workers.items()
            if w.source == source and wid.startswith(scope) and wid not in wanted
        ]
        for wid in gone:
            del self._workers[wid]
        for info in wanted.values():
            self.upsert(info, source)
        return gone

    def expire(self) -> list[str]:
        """Drop registered workers whose heartbeats stopped; returns their ids."""
        cutoff = self._clock() - self.ttl_s
        gone = [wid for wid, w in self._workers.items() if w.source == "registered" and w.last_seen < cutoff]
        for wid in gone:
            del self._workers[wid]
        return gone

    def mark_failed(self, worker: Worker, hard: bool = False) -> None:
        """Count a failed attempt; ``hard`` (connection refused/reset) opens the breaker at once."""
        if hard:
            worker.breaker.trip()
        else:
            worker.breaker.record_failure()

    def mark_ok(self, worker: Worker) -> None:
        worker.breaker.record_success()

    def set_probe(self, worker: Worker, ok: bool, unhealthy_after: int = 1, healthy_after: int = 1) -> bool:
        """Record one active health check; returns True when the worker's probe status changed."""
        before = worker.probe_ok
        if ok:
            worker.probe_failures = 0
            worker.probe_successes += 1
            if worker.probe_successes >= healthy_after:
                worker.probe_ok = True
        else:
            worker.probe_successes = 0
            worker.probe_failures += 1
            if worker.probe_failures >= unhealthy_after:
                worker.probe_ok = False
        return before != worker.probe_ok

    def _live(self, w: Worker, now: float) -> bool:
        if w.source == "registered":
            return now - w.last_seen <= self.ttl_s
        return w.probe_ok

    def is_healthy(self, w: Worker) -> bool:
        return self._live(w, self._clock()) and w.breaker.state != "open"

    def candidates(self, role: str, model: str | None = None) -> list[Worker]:
        """Live workers that serve ``role`` (and ``model``) whose breaker allows an attempt, in insertion order.

        Panic mode: when every live worker of the role has its breaker open, they are all returned,
        soonest-to-recover first, rather than failing the request without trying. Workers whose breaker is not
        closed and that missed two heartbeats are left out of both (while any other worker is left).
        """
        now = self._clock()
        live = [w for w in self._workers.values() if w.serves(role, model) and self._live(w, now)]
        # A worker that fails and stopped heartbeating is gone, not slow: no trials or panic attempts for it
        # before its TTL ends (unless nothing else is left).
        pool = [w for w in live if not self._silent_and_failing(w, now)] or live
        allowed = [w for w in pool if w.breaker.allows()]
        return allowed or sorted(pool, key=lambda w: w.breaker.opened_until)

    def _silent_and_failing(self, w: Worker, now: float) -> bool:
        """A registered worker whose breaker is not closed and that missed two heartbeats (TTL / 4 apart)."""
        return (
            w.source == "registered"
            and w.breaker.state != "closed"
            and now - w.last_seen > self.heartbeat_interval_s * 2
        )

    @property
    def heartbeat_interval_s(self) -> float:
        """The interval the router asks registered workers to heartbeat at."""
        return max(0.5, self.ttl_s / 4)

    def healthy_count(self, role: str) -> int:
        """Workers of ``role`` that are live and whose breaker is not open."""
        return sum(1 for w in self._workers.values() if w.serves(role, None) and self.is_healthy(w))

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def is_adapter(self, model: str) -> bool:
        """True when a worker serves ``model`` as a LoRA adapter."""
        return any(model in w.info.adapters for w in self._workers.values())

    def models(self) -> dict[str, dict[str, int | None]]:
        """Model name -> {'max_model_len': ...} over healthy workers."""
        out: dict[str, dict[str, int | None]] = {}
        for w in self._workers.values():
            if not self.is_healthy(w):
                continue
            for m in w.info.models:
                out.setdefault(m, {"max_model_len": w.info.max_model_len})
        return out
