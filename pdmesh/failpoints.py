"""Failpoints: named places in the protocol where a test can make a real process die (or stall) on purpose.

The fault-injection suite (``tests/faults/``) kills processes *at a given protocol step* (a sender after ALLOC
and before WRITE, a cache server in the middle of a payload, ...), which a signal from outside cannot hit
reliably. Each such step calls :func:`hit` with its name. The mechanism is the one etcd (gofail) and TiKV
(fail-rs) use, armed through the file system so that it reaches every process of a cluster:

- off unless ``PDMESH_FAILPOINTS_DIR`` is set when the process starts (then :func:`hit` is one ``os.rename``
  attempt; without it, one comparison with ``None``: no cost in production);
- a test arms a failpoint by writing the file ``$PDMESH_FAILPOINTS_DIR/<name>`` whose content is the action:
  ``kill`` (SIGKILL this process), ``stop`` (SIGSTOP it: a hung peer) or ``sleep <seconds>``;
- the first process that reaches the point claims the file by renaming it to ``<name>.fired.<pid>`` (atomic:
  exactly one process fires, once) and then acts. The test sees which process fired from the file name.

Names in use: ``transfer.sender.after_alloc``, ``transfer.sender.after_write``, ``transfer.receiver.alloc``,
``kvcache.tier.load`` (a slot allocated, the disk/remote read not done), ``kvcache.cache_server.payload``
(half of a ``get`` payload sent).
"""

from __future__ import annotations

import os
import signal
import time

ENV = "PDMESH_FAILPOINTS_DIR"
_DIR = os.environ.get(ENV) or None


def hit(name: str) -> bool:
    """Fire the failpoint ``name`` if it is armed. Returns True when it fired (after a ``sleep``; ``kill`` and
    ``stop`` do not return while the process is stopped, or at all)."""
    action = claim(name)
    if action is None:
        return False
    act(action)
    return True


def claim(name: str) -> list[str] | None:
    """Claim ``name`` if it is armed and return its action (for a caller that does part of its step first, then
    calls :func:`act`); None when it is not armed or another process claimed it."""
    if _DIR is None:
        return None
    armed = os.path.join(_DIR, name)
    fired = f"{armed}.fired.{os.getpid()}"
    try:
        os.rename(armed, fired)
    except OSError:
        return None
    try:
        with open(fired) as f:
            return f.read().split() or ["kill"]
    except OSError:
        return ["kill"]


def act(action: list[str]) -> None:
    """Carry out a claimed action."""
    if action[0] == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action[0] == "sleep":
        time.sleep(float(action[1]) if len(action) > 1 else 1.0)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def arm(directory: str, name: str, action: str = "kill") -> str:
    """Arm ``name`` in ``directory`` (the test side); returns the armed file's path."""
    path = os.path.join(directory, name)
    tmp = path + ".arming"
    with open(tmp, "w") as f:
        f.write(action)
    os.rename(tmp, path)
    return path


def fired_by(directory: str, name: str) -> list[int]:
    """PIDs of the processes that fired ``name`` so far (the test side)."""
    prefix = name + ".fired."
    return [int(f[len(prefix) :]) for f in os.listdir(directory) if f.startswith(prefix)]
