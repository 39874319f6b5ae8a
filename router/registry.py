"""Soft-state registry of workers, rebuilt from heartbeats (any router replica converges on its own).

Invariants: a worker is *healthy* when its last heartbeat is younger than ``ttl_s`` and it is not in a failure
cooldown. Expired workers are removed by :meth:`Registry.expire`, called periodically by the app. All methods
are synchronous and cheap; they run on the router's event loop (no locking needed: single-threaded).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from router.registration import WorkerRegistration


@dataclass
class Worker:
    info: WorkerRegistration
    last_seen: float
    failed_until: float = 0.0
    consecutive_failures: int = 0
    in_flight: int = 0
    registered_at: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return self.info.worker_id

    @property
    def url(self) -> str:
        return self.info.url

    def serves(self, role: str, model: str | None) -> bool:
        return (self.info.role == role or self.info.role == "both") and (
            model is None or model in self.info.models
        )


class Registry:
    def __init__(self, ttl_s: float, failure_cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.failure_cooldown_s = failure_cooldown_s
        self._clock = clock
        self._workers: dict[str, Worker] = {}

    def upsert(self, info: WorkerRegistration) -> Worker:
        """Register or refresh a worker. A changed URL/role replaces the entry (a restarted worker)."""
        now = self._clock()
        w = self._workers.get(info.worker_id)
        if w is None or w.info.url != info.url or w.info.role != info.role:
            w = Worker(info=info, last_seen=now)
            self._workers[info.worker_id] = w
        else:
            w.info = info
            w.last_seen = now
        return w

    def remove(self, worker_id: str) -> bool:
        return self._workers.pop(worker_id, None) is not None

    def expire(self) -> list[str]:
        """Drop workers whose heartbeats stopped; returns their ids."""
        cutoff = self._clock() - self.ttl_s
        gone = [wid for wid, w in self._workers.items() if w.last_seen < cutoff]
        for wid in gone:
            del self._workers[wid]
        return gone

    def mark_failed(self, worker: Worker) -> None:
        """Skip a worker for the cooldown after a connection-level failure."""
        worker.consecutive_failures += 1
        worker.failed_until = self._clock() + self.failure_cooldown_s

    def mark_ok(self, worker: Worker) -> None:
        worker.consecutive_failures = 0
        worker.failed_until = 0.0

    def is_healthy(self, w: Worker) -> bool:
        now = self._clock()
        return now - w.last_seen <= self.ttl_s and w.failed_until <= now

    def candidates(self, role: str, model: str | None = None) -> list[Worker]:
        """Healthy workers that serve ``role`` (and ``model``), in registration order.

        Panic mode: when every live (heartbeating) worker of the role is in failure cooldown, they are all
        returned, soonest-to-recover first, rather than failing the request without trying.
        """
        now = self._clock()
        live = [
            w for w in self._workers.values() if w.serves(role, model) and now - w.last_seen <= self.ttl_s
        ]
        healthy = [w for w in live if w.failed_until <= now]
        return healthy or sorted(live, key=lambda w: w.failed_until)

    def healthy_count(self, role: str) -> int:
        """Workers of ``role`` that are heartbeating and not in failure cooldown."""
        return sum(1 for w in self._workers.values() if w.serves(role, None) and self.is_healthy(w))

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def models(self) -> dict[str, dict[str, int | None]]:
        """Model name -> {'max_model_len': ...} over healthy workers."""
        out: dict[str, dict[str, int | None]] = {}
        for w in self._workers.values():
            if not self.is_healthy(w):
                continue
            for m in w.info.models:
                out.setdefault(m, {"max_model_len": w.info.max_model_len})
        return out
