"""Child processes that never outlive their owner.

Every child is started in its own session (so its whole tree can be signalled as a group) and, on Linux, with
``PR_SET_PDEATHSIG`` so that it receives SIGTERM if its parent dies without cleaning up (even on SIGKILL).
The owner of a :class:`ManagedProcess` must call :meth:`ManagedProcess.stop`; it is idempotent.
Linux sends the death signal when the *thread* that spawned the child exits, not the process: start long-lived
children from a thread that lives as long as their owner (the main thread, an event loop's thread), never from a
short-lived or pool thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("pdmesh.procs")

_PR_SET_PDEATHSIG = 1
STRAGGLER_GRACE_S = 5.0  # after the leader of a stopped group exits, how long the rest may take to exit


def _child_setup() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except OSError:
            pass


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    out: list[int] = []
    try:
        entries = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in entries:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            out.append(int(pid))
    return out


class ManagedProcess:
    """A subprocess (and its process group) owned by the caller."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self._log_file = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned, closed in stop()
        out = self._log_file if self._log_file else None
        self.proc = subprocess.Popen(
            self.argv,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_child_setup,
        )
        log.debug("started %s pid=%d: %s", name, self.proc.pid, " ".join(self.argv))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def group_alive(self) -> bool:
        """Whether any live process of the group is left. Zombies do not count: where nobody reaps orphans (an
        agent that is PID 1 in a container) they stay, and waiting for them would only wait out the grace."""
        if os.path.isdir("/proc/self"):
            return bool(group_pids(self.proc.pid))
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _wait_group_gone(self, seconds: float) -> None:
        """Poll :meth:`group_alive` every 50 ms until it is false or ``seconds`` have passed. Blocking."""
        end = time.monotonic() + seconds
        while self.group_alive() and time.monotonic() < end:
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the process group, wait up to ``timeout`` s for the leader, then up to
        ``min(timeout, STRAGGLER_GRACE_S)`` more for the rest of the group to finish its own shutdown (a vLLM API
        server exits before its engine and workers, which unlink their shared memory on the way out), then
        SIGKILL whatever is left and wait (at most ``STRAGGLER_GRACE_S``) until no live process of the group is
        left. Blocking; idempotent."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing", self.name, timeout)
            else:
                self._wait_group_gone(min(timeout, STRAGGLER_GRACE_S))
        # Kill stragglers of the group even if the leader exited (grandchildren).
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._wait_group_gone(STRAGGLER_GRACE_S)
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition") -> None:
    """Poll ``predicate`` until true; raise TimeoutError after ``timeout`` s. Blocking."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, for a server started a moment later. Chosen below the kernel's ephemeral
    range where there is room: a port from that range (what binding port 0 gives) can be taken meanwhile as the
    source port of any outgoing connection, and the server then fails with "address in use". Not reserved: two
    callers may still race for one port (random choice among ~20k makes that rare)."""
    import random
    import socket

    try:
        low = int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low > 11000:
        for port in random.sample(range(10000, low), 64):
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
