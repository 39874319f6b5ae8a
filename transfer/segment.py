"""POSIX shared-memory segments: the memory chunk bytes live in on a node, and the one place that makes or maps
them. The tier's pool (``pdmesh.kvcache.pool``) and the transfer layer's reference pool are built on a
:class:`SharedSegment`; the vLLM process and the shm transfer backend map one by name with :func:`attach_segment`.

:class:`SharedSegment` creates ``/dev/shm/<name>`` (mode 0600, ``O_EXCL``), reserves all of its memory up front
(``posix_fallocate``: a ``/dev/shm`` too small fails at start with :class:`SegmentSpaceError` naming the sizes,
instead of a SIGBUS on some later write), maps it, and unlinks it on :meth:`SharedSegment.close` or, failing
that, when the object is garbage collected or the process exits. A process killed with SIGKILL cannot unlink:
:func:`sweep_stale_segments` removes the segments of processes that no longer exist.
:func:`attach_segment` maps an existing segment by name for a client.

Liveness: the creator holds a shared ``flock`` on the segment file from before it has any size until it is
unlinked (the kernel drops it when the process dies, however it dies). That lock, not the pid in the name, is
what tells the sweep that an owner is alive: ``/dev/shm`` may be shared by processes in other PID namespaces
(containers of one pod, ``--ipc=host``), whose pids mean nothing (or another process) here, while a lock on the
same file is seen by every process that opens it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import shutil
import stat
import time
import weakref

log = logging.getLogger("pdmesh.segment")
SHM_DIR = "/dev/shm"

# Names pdmesh gives segments (``pdmesh-tier-<pid>-<hex>``, ``pdmesh-ref-<pid>-<hex>``, or a configured name with
# the same prefix): never a path. A name from a peer is mapped only when it matches.
SEGMENT_NAME = re.compile(r"pdmesh-[A-Za-z0-9_-][A-Za-z0-9_.-]{0,200}")


def segment_path(name: str) -> str:
    """``/dev/shm/<name>`` for a valid pdmesh segment name; ValueError for anything else (a path, ``..``)."""
    if not SEGMENT_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid shared-memory segment name {name!r} (pdmesh-..., no path)")
    return os.path.join(SHM_DIR, name)


def _unlink_quiet(path: str, fd: int) -> None:
    """Unlink ``path``, then close ``fd`` (the owner's lock goes last: no moment shows the name unlocked)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def attach_segment(name: str) -> mmap.mmap:
    """Map an existing pool segment by name, read/write. The caller closes the mmap (release views first).
    Raises FileNotFoundError when the segment does not exist (tier server gone)."""
    fd = os.open(segment_path(name), os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


class SegmentSpaceError(OSError):
    """``/dev/shm`` cannot hold the segment."""


_OWNED = re.compile(r"pdmesh-[a-z]+-(\d+)-[0-9a-f]{8}")
# A segment of size 0 without its lock may be one whose creator has not locked it yet (it locks right after the
# O_EXCL create, before it gives the file any size): such a file is left alone this long after its last change.
CREATING_S = 10.0


def _pid_alive_here(pid: int) -> bool:
    """True unless no process ``pid`` exists in this PID namespace (EPERM: one exists, not ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_if_ownerless(path: str) -> bool:
    """Unlink ``path`` when it is a regular file of this user that nobody holds a lock on (its creator is gone,
    in whatever PID namespace it ran) and it is not one being created now; True when it was unlinked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # gone, a symlink, or not ours to open
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its owner holds the lock: alive (EWOULDBLOCK), or the lock is not usable here
        if st.st_size == 0 and time.time() - st.st_mtime < CREATING_S:
            return False  # maybe created a moment ago and not locked yet
        try:  # unlink the file that was checked, not another one that took its name since
            now = os.lstat(path)
        except OSError:
            return False
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep_stale_segments() -> list[str]:
    """Unlink the ``pdmesh-<kind>-<pid>-<hex>`` segments whose creator is gone (a SIGKILLed tier server leaves its
    pool behind); returns the names removed.

    A segment is removed only when all of these hold: no process ``<pid>`` exists in this PID namespace (the
    old rule, kept so that a segment of a live process here is never touched, even one made before segments
    were locked); it is a regular file of this user; and no process anywhere holds a lock on it (its creator,
    in this or another PID namespace sharing ``/dev/shm``, holds one while it lives; see the module docstring).
    Names without a pid, and this process's own segments, are left alone. Never raises."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        m = _OWNED.fullmatch(name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive_here(int(m.group(1))):
            continue
        if _unlink_if_ownerless(os.path.join(SHM_DIR, name)):
            removed.append(name)
    if removed:
        log.info("removed %d stale shared-memory segments of dead processes: %s", len(removed), removed)
    return removed


class SharedSegment:
    """A new segment of ``nbytes`` named ``name``; ``buffer`` is a writable view of all of it.
    ``prefault=True`` touches every page at creation (slower start, no page faults on the data path).
    The segment's file stays open, with a shared ``flock`` on it, until :meth:`close` (or the process's end): the
    proof of life :func:`sweep_stale_segments` looks for."""

    def __init__(self, name: str, nbytes: int, *, prefault: bool = False) -> None:
        self.name = name
        self.nbytes = nbytes
        path = segment_path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # before the file has any size (see CREATING_S); blocks only while a sweep probes it (microseconds)
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.ftruncate(fd, nbytes)
            try:
                os.posix_fallocate(fd, 0, nbytes)  # reserve now: no SIGBUS when a later write finds no memory
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise
                free = shutil.disk_usage(SHM_DIR).free
                raise SegmentSpaceError(
                    e.errno,
                    f"shared memory for {name} needs {nbytes} bytes ({nbytes / (1 << 20):.0f} MiB) but {SHM_DIR} "
                    f"has {free / (1 << 20):.0f} MiB free: lower the pool (--tier-pool-bytes, "
                    "PDMESH_TIER_POOL_BYTES) or give the container more /dev/shm (compose: shm_size, "
                    "PDMESH_SHM_SIZE; docker run --shm-size)",
                ) from None
            self._mmap = mmap.mmap(fd, nbytes)
        except BaseException:
            os.unlink(path)
            os.close(fd)
            raise
        self._unlinker = weakref.finalize(self, _unlink_quiet, path, fd)
        self.buffer = memoryview(self._mmap)
        if prefault:
            zeros = bytes(min(nbytes, 1 << 22))
            for off in range(0, nbytes, len(zeros)):
                n = min(len(zeros), nbytes - off)
                self.buffer[off : off + n] = zeros[:n]

    def close(self) -> None:
        """Unmap, unlink and drop the lock. Views handed out must be released first (else the mapping stays until
        they are garbage collected; the name is unlinked regardless). Idempotent."""
        try:
            self.buffer.release()
            self._mmap.close()
        except BufferError:
            pass
        self._unlinker()
