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

Whoever can write in that directory can kill or hang the process at will, so the directory is trusted only when
it is a directory owned by this process's user (effective uid) or root and not writable by everyone (``/tmp``
itself, or a ``chmod 777`` directory, is refused: failpoints stay off, with a WARNING); a claimed file is acted on
only when it is a regular file (not a symlink) with the same owner rule and not world-writable. Whenever
failpoints are on, the process says so once at start with a WARNING naming the directory, and again (WARNING) for
each failpoint it fires.

Names in use: ``transfer.sender.after_alloc``, ``transfer.sender.after_write``, ``transfer.receiver.alloc``,
``kvcache.tier.load`` (a slot allocated, the disk/remote read not done), ``kvcache.cache_server.payload``
(half of a ``get`` payload sent).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import time

ENV = "PDMESH_FAILPOINTS_DIR"
log = logging.getLogger("pdmesh.failpoints")
_DIR: str | None = None


def _untrusted(st: os.stat_result, what: str) -> str | None:
    """Why a file or directory with status ``st`` cannot arm failpoints, or None when it can."""
    if st.st_uid not in (os.geteuid(), 0):
        return f"{what} is owned by uid {st.st_uid}, neither this user ({os.geteuid()}) nor root"
    if st.st_mode & stat.S_IWOTH:
        return f"{what} is world-writable (mode {stat.filemode(st.st_mode)})"
    return None


def configure(directory: str | None) -> str | None:
    """Turn failpoints on from ``directory`` (the value of ``PDMESH_FAILPOINTS_DIR``; read once at import), or off
    for None/empty. A directory that is missing, not a directory, owned by another user than this one or root, or
    world-writable is refused: failpoints stay off and a WARNING says why. On success a WARNING says that
    failpoints are armed from it (once per call). Returns the directory in effect (None: off)."""
    global _DIR
    _DIR = None
    if not directory:
        return None
    try:
        st = os.stat(directory)
    except OSError as e:
        log.warning("failpoints NOT armed: %s=%s cannot be read (%s)", ENV, directory, e)
        return None
    why = "it is not a directory" if not stat.S_ISDIR(st.st_mode) else _untrusted(st, "it")
    if why:
        log.warning("failpoints NOT armed: %s=%s is refused: %s", ENV, directory, why)
        return None
    _DIR = directory
    log.warning(
        "failpoints ARMED from %s=%s: a file written there can kill or stop this process (pid %d); "
        "this is for fault-injection tests only",
        ENV,
        directory,
        os.getpid(),
    )
    return _DIR


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
    calls :func:`act`); None when it is not armed, another process claimed it, or the claimed file is not one
    to trust (see the module docstring: refused with a WARNING, not acted on)."""
    if _DIR is None:
        return None
    armed = os.path.join(_DIR, name)
    fired = f"{armed}.fired.{os.getpid()}"
    try:
        os.rename(armed, fired)
    except OSError:
        return None
    try:
        fd = os.open(fired, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        log.warning("failpoint %s refused: %s cannot be opened as a plain file (%s)", name, fired, e)
        return None
    try:
        st = os.fstat(fd)
        why = "it is not a regular file" if not stat.S_ISREG(st.st_mode) else _untrusted(st, "the file")
        if why:
            log.warning("failpoint %s refused: %s", name, why)
            return None
        with os.fdopen(os.dup(fd)) as f:
            action = f.read(4096).split() or ["kill"]
    except OSError as e:
        log.warning("failpoint %s refused: %s cannot be read (%s)", name, fired, e)
        return None
    finally:
        os.close(fd)
    log.warning("failpoint %s fired in pid %d: %s", name, os.getpid(), " ".join(action))
    return action


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


configure(os.environ.get(ENV) or None)
