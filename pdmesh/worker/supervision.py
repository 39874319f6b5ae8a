"""Keeping a worker's two children running: its tier server (:class:`TierWatch`) and its vLLM engine
(:class:`EngineWatch`).

Both are polled by the worker's heartbeat loop (one event loop, no threads of their own) and never block it: a
restart that waits for readiness runs in a worker thread. New children are spawned on the loop's own thread,
never in a pool thread: their ``PR_SET_PDEATHSIG`` fires when the thread that spawned them exits. Restarts back off (1 s doubling to 30 s) after a
failed start. Each watch owns the process it holds at any time (``.tier`` / ``.server``); the agent stops that
one when it exits, including one still starting.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdmesh.router.registration import WorkerRegistration
    from pdmesh.worker.tier_process import TierProcess
    from pdmesh.worker.vllm_process import VLLMServer

log = logging.getLogger("pdmesh.worker")


class CrashLoop(RuntimeError):
    """A child exited more than ``max_exits`` times within ``window_s``: restarting it again would not help."""


def log_tail(path: str | None, n: int = 20) -> str:
    """The last ``n`` lines of a child's log file (for the message that says why it died)."""
    try:
        with open(path or "", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


class _Backoff:
    """When the next restart may run: at once after an exit, then 1 s doubling to 30 s after failed starts."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._next_try = 0.0
        self._delay = 1.0

    def due(self) -> bool:
        return self._clock() >= self._next_try

    def failed(self) -> float:
        delay = self._delay
        self._next_try = self._clock() + delay
        self._delay = min(self._delay * 2, 30.0)
        return delay

    def succeeded(self) -> None:
        self._next_try, self._delay = 0.0, 1.0


class TierWatch:
    """Keeps the node's tier server running. When it exits, the worker advertises no tier (no transfer address:
    the router sends this node no pushes, and its engine computes what it cannot load) and restarts it with
    backoff; once the new one is ready, its addresses are advertised again. The engine's connector reconnects to
    the new server by itself (same socket path, new segment)."""

    def __init__(self, tier: TierProcess, start: Callable[[], TierProcess], clock=time.monotonic) -> None:
        """``start`` spawns a new tier server and returns at once (not yet ready)."""
        self.tier = tier
        self._start = start
        self._backoff = _Backoff(clock)
        self._reported = False
        self.restarts = 0

    async def advertised(self, reg: WorkerRegistration) -> WorkerRegistration:
        """``reg`` with the tier's current addresses, or without any while it is down (restarting it when due).

        Blocks the caller (not the loop) for at most the tier's start timeout while a restart runs."""
        if not self.tier.process.alive():
            if not self._reported:
                log.error(
                    "tier server exited with code %s; restarting it. Its last log lines:\n%s",
                    self.tier.process.poll(),
                    log_tail(getattr(self.tier, "log_path", None)),
                )
                self._reported = True
            if self._backoff.due():
                try:
                    await asyncio.to_thread(self.tier.stop)
                    # spawned on this (the loop's) thread: PR_SET_PDEATHSIG follows the spawning thread
                    self.tier = self._start()
                    await asyncio.to_thread(self.tier.wait_ready, 60.0)
                    self.restarts += 1
                    self._reported = False
                    self._backoff.succeeded()
                    log.info("tier server restarted: %s", self.tier.info)
                except (RuntimeError, TimeoutError, OSError) as e:
                    delay = self._backoff.failed()
                    log.error("tier server restart failed (%s); next try in %.0fs", e, delay)
        if not self.tier.process.alive():
            return reg.model_copy(update={"tier_url": None, "transfer_address": None})
        info = self.tier.info
        return reg.model_copy(update={"tier_url": info.get("http"), "transfer_address": info.get("transfer")})


class EngineWatch:
    """Keeps the node's vLLM engine running.

    :meth:`serving` says whether the engine is up and healthy now. When the engine process has exited it logs
    the exit code and the engine's last log lines, starts a new one with the same command (``start`` returns a
    new, not yet healthy :class:`VLLMServer` at once) and waits for its health check in a thread
    (``startup_timeout`` s); until then :meth:`serving` is False and the worker stays deregistered. More than
    ``max_exits`` exits (or failed starts) within ``window_s`` (15 minutes: an engine may take minutes to
    start, so a shorter window would never see a loop) raise :class:`CrashLoop` (the worker then exits non-zero and says why).
    """

    def __init__(
        self,
        server: VLLMServer,
        start: Callable[[], VLLMServer],
        startup_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        max_exits: int = 5,
        window_s: float = 900.0,
    ) -> None:
        self.server = server
        self._start = start
        self._startup_timeout = startup_timeout
        self._clock = clock
        self._backoff = _Backoff(clock)
        self._exits: deque[float] = deque()
        self._max_exits, self._window_s = max_exits, window_s
        self._starting: asyncio.Future | None = None
        self._reported = False
        self.restarts = 0

    async def serving(self) -> bool:
        """True while the engine is up and has passed its health check since its (re)start. Never blocks the
        event loop (stopping the dead engine and waiting for the new one run in threads)."""
        if self._starting is not None:
            if not self._starting.done():
                return False
            error = self._starting.exception()
            self._starting = None
            if error is None:
                self.restarts += 1
                self._reported = False
                self._backoff.succeeded()
                log.info("vLLM restarted and healthy at %s (restart %d)", self.server.url, self.restarts)
                return True
            await asyncio.to_thread(self.server.stop, 5.0)
            delay = self._backoff.failed()
            log.error("vLLM restart failed (%s); next try in %.0fs", error, delay)
            self._count_exit(f"restart failed: {error}")
        if self.server.process.alive():
            return True
        if not self._reported:
            self._note_exit()
        if self._backoff.due():
            await asyncio.to_thread(self.server.stop, 5.0)
            try:
                self.server = self._start()
            except (OSError, RuntimeError, ValueError) as e:  # could not even spawn it (a bad path, no fds)
                delay = self._backoff.failed()
                log.error("vLLM could not be started (%s); next try in %.0fs", e, delay)
                self._count_exit(f"start failed: {e}")
                return False
            self._starting = asyncio.ensure_future(
                asyncio.to_thread(self.server.wait_healthy, self._startup_timeout)
            )
        return False

    def _note_exit(self) -> None:
        code = self.server.process.poll()
        self._count_exit(f"last exit code {code}")
        tail = log_tail(getattr(self.server, "log_path", None))
        log.error("vLLM exited with code %s; restarting it. Its last log lines:\n%s", code, tail)
        self._reported = True

    def _count_exit(self, what: str) -> None:
        now = self._clock()
        self._exits.append(now)
        while self._exits and self._exits[0] < now - self._window_s:
            self._exits.popleft()
        if len(self._exits) > self._max_exits:
            raise CrashLoop(
                f"vLLM exited or failed to start {len(self._exits)} times in {self._window_s:.0f}s ({what}); "
                f"not restarting it again. Its last log lines:\n{log_tail(getattr(self.server, 'log_path', None))}"
            )

    async def aclose(self) -> None:
        """Stop waiting for a restart in progress (the caller stops :attr:`server`, which ends the wait)."""
        if self._starting is not None and not self._starting.done():
            self.server.process.signal_group(signal.SIGKILL)
            try:
                await asyncio.wait_for(asyncio.shield(self._starting), 5.0)
            except (asyncio.TimeoutError, RuntimeError, TimeoutError):
                pass
