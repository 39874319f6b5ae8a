"""Keeping a worker's two children running: its tier server (:class:`TierWatch`) and its vLLM engine
(:class:`EngineWatch`).

Both are polled by the worker's heartbeat loop (one event loop, no threads of their own) and never block it: a
restart that waits for readiness runs in a worker thread. New children are spawned on the loop's own thread,
never in a pool thread: their ``PR_SET_PDEATHSIG`` fires when the thread that spawned them exits. When to restart
and when to give up is :mod:`pdmesh.restart_policy` with :data:`TIER_RESTART_POLICY` / :data:`ENGINE_RESTART_POLICY`:
a child that exits is restarted at once, a failed start backs off (1 s doubling to 30 s). Each watch owns the
process it holds at any time (``.tier`` / ``.server``); the agent stops that one when it exits, including one
still starting. :class:`CrashLoop` and :func:`log_tail` are :mod:`pdmesh.restart_policy`'s, importable from here.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pdmesh.restart_policy import CrashLoop, RestartPolicy, RestartTracker, log_tail

if TYPE_CHECKING:
    from pdmesh.router.registration import WorkerRegistration
    from pdmesh.worker.tier_process import TierProcess
    from pdmesh.worker.vllm_process import VLLMServer

__all__ = [
    "ENGINE_RESTART_POLICY",
    "TIER_RESTART_POLICY",
    "CrashLoop",
    "EngineWatch",
    "TierWatch",
    "log_tail",
]

log = logging.getLogger("pdmesh.worker")

# The tier server: restarted forever (the worker serves without it meanwhile), 1 s doubling to 30 s after
# failed starts.
TIER_RESTART_POLICY = RestartPolicy(first_delay_s=1.0, max_delay_s=30.0, factor=2.0, max_exits=None)
# The vLLM engine: the same backoff; more than 5 exits or failed starts within 15 minutes is a crash loop (an
# engine may take minutes to start, so a shorter window would never see one).
ENGINE_RESTART_POLICY = RestartPolicy(
    first_delay_s=1.0, max_delay_s=30.0, factor=2.0, max_exits=5, window_s=900.0
)


class TierWatch:
    """Keeps the node's tier server running (:data:`TIER_RESTART_POLICY`: forever, with backoff). When it exits,
    the worker advertises no tier at once (no transfer address: the router sends this node no pushes, and its
    engine computes what it cannot load) and restarts it in a background task, so heartbeats never wait for a
    restart (a tier may take a minute to become ready; the router would drop a worker that stopped beating).
    Once the new one is ready, its addresses are advertised again. The engine's connector reconnects to the new
    server by itself (same socket path, new segment). :meth:`aclose` cancels a restart in progress;
    :attr:`tier` is always the newest process (the one to stop)."""

    def __init__(
        self,
        tier: TierProcess,
        start: Callable[[], TierProcess],
        clock: Callable[[], float] = time.monotonic,
        policy: RestartPolicy = TIER_RESTART_POLICY,
    ) -> None:
        """``tier`` is ready (the agent waited for it); ``start`` spawns a new tier server and returns at once
        (not yet ready)."""
        self.tier = tier
        self._start = start
        self._tracker = RestartTracker(policy, clock, name="tier server")
        self._tracker.healthy()
        self._reported = False
        self._restart: asyncio.Task | None = None
        self._ready = True
        self.restarts = 0

    async def advertised(self, reg: WorkerRegistration) -> WorkerRegistration:
        """``reg`` with the tier's current addresses, or without any while it is down or restarting (starting a
        restart in the background when one is due). Returns at once. Raises :class:`CrashLoop` only under a
        policy that gives up (not the default)."""
        if self._restart is None and not self.tier.process.alive():
            if not self._reported:
                code = self.tier.process.poll()
                tail = log_tail(getattr(self.tier, "log_path", None))
                self._reported = True
                delay = self._tracker.exited(f"exit code {code}", last_log=tail)
                log.error(
                    "tier server exited with code %s; restarting it in %.0fs. Its last log lines:\n%s",
                    code,
                    delay,
                    tail,
                )
            self._ready = False
            if self._tracker.due():
                self._restart = asyncio.create_task(self._restart_tier(), name="tier-restart")
        if self._restart is not None and self._restart.done():
            self._restart = None
        if self._restart is not None or not self._ready or not self.tier.process.alive():
            return reg.model_copy(update={"tier_url": None, "transfer_address": None})
        info = self.tier.info
        return reg.model_copy(update={"tier_url": info.get("http"), "transfer_address": info.get("transfer")})

    async def _restart_tier(self) -> None:
        try:
            await asyncio.to_thread(self.tier.stop)
            # spawned on the loop's thread (this task's): PR_SET_PDEATHSIG follows the spawning thread
            self.tier = self._start()
            self._tracker.started()
            await asyncio.to_thread(self.tier.wait_ready, 60.0)
            self.restarts += 1
            self._reported, self._ready = False, True
            self._tracker.healthy()
            log.info("tier server restarted: %s", self.tier.info)
        except Exception as e:  # any failure to start backs off (never one restart per heartbeat)
            await asyncio.to_thread(self.tier.stop)  # one that started but never became ready goes too
            delay = self._tracker.start_failed(str(e))  # the default policy never gives up
            log.error("tier server restart failed (%s); next try in %.0fs", e, delay)

    async def aclose(self) -> None:
        """Cancel a restart in progress (the caller then stops :attr:`tier`)."""
        if self._restart is not None:
            self._restart.cancel()
            await asyncio.gather(self._restart, return_exceptions=True)
            self._restart = None


class EngineWatch:
    """Keeps the node's vLLM engine running (:data:`ENGINE_RESTART_POLICY`).

    :meth:`serving` says whether the engine is up and healthy now. When the engine process has exited it logs
    the exit code and the engine's last log lines, starts a new one with the same command (``start`` returns a
    new, not yet healthy :class:`VLLMServer` at once) and waits for its health check in a thread
    (``startup_timeout`` s); until then :meth:`serving` is False and the worker stays deregistered. A failed
    start backs off; the policy's crash-loop rule (by default more than 5 exits or failed starts within 15
    minutes) raises :class:`CrashLoop`, with the engine's last log lines (the worker then exits non-zero and
    says why).
    """

    def __init__(
        self,
        server: VLLMServer,
        start: Callable[[], VLLMServer],
        startup_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        policy: RestartPolicy = ENGINE_RESTART_POLICY,
    ) -> None:
        """``server`` is healthy (the agent waited for it)."""
        self.server = server
        self._start = start
        self._startup_timeout = startup_timeout
        self._tracker = RestartTracker(policy, clock, name="vLLM")
        self._tracker.healthy()
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
                self._tracker.healthy()
                log.info("vLLM restarted and healthy at %s (restart %d)", self.server.url, self.restarts)
                return True
            await asyncio.to_thread(self.server.stop, 5.0)
            log.error("vLLM restart failed (%s); next try in %.0fs", error, self._tracker.next_delay)
            self._tracker.start_failed(f"restart failed: {error}", last_log=self._tail())
        if self.server.process.alive():
            return True
        if not self._reported:
            self._note_exit()
        if self._tracker.due():
            await asyncio.to_thread(self.server.stop, 5.0)
            try:
                self.server = self._start()
            except (OSError, RuntimeError, ValueError) as e:  # could not even spawn it (a bad path, no fds)
                log.error("vLLM could not be started (%s); next try in %.0fs", e, self._tracker.next_delay)
                self._tracker.start_failed(f"start failed: {e}", last_log=self._tail())
                return False
            self._tracker.started()
            self._starting = asyncio.ensure_future(
                asyncio.to_thread(self.server.wait_healthy, self._startup_timeout)
            )
        return False

    def _tail(self) -> str:
        return log_tail(getattr(self.server, "log_path", None))

    def _note_exit(self) -> None:
        code = self.server.process.poll()
        tail = self._tail()
        self._reported = True
        delay = self._tracker.exited(f"last exit code {code}", last_log=tail)
        log.error(
            "vLLM exited with code %s; restarting it in %.0fs. Its last log lines:\n%s", code, delay, tail
        )

    async def aclose(self) -> None:
        """Stop waiting for a restart in progress (the caller stops :attr:`server`, which ends the wait)."""
        if self._starting is not None and not self._starting.done():
            self.server.process.signal_group(signal.SIGKILL)
            try:
                await asyncio.wait_for(asyncio.shield(self._starting), 5.0)
            except (asyncio.TimeoutError, RuntimeError, TimeoutError):
                pass
