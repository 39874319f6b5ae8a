"""POSIX shared-memory segments: the memory chunk bytes live in on a node, and the one place that makes or maps
them. The tier's pool (``pdmesh.kvcache.pool``) and the transfer layer's reference pool are built on a
:class:`SharedSegment`; the vLLM process and the shm transfer backend map one by name with :func:`attach_segment`.

:class:`SharedSegment` creates ``/dev/shm/<name>`` (mode 0600, ``O_EXCL``), reserves all of its memory up front
(``posix_fallocate``: a ``/dev/shm`` too small fails at start with :class:`SegmentSpaceError` naming the sizes,
instead of a SIGBUS on some later write), maps it, and unlinks it on :meth:`SharedSegment.close` or, failing
that, when the object is garbage collected or the process exits. A process killed with SIGKILL cannot unlink:
:func:`sweep_stale_segments` removes the segments of processes that no longer exist.
:func:`attach_segment` maps an existing segment by name for a client.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import shutil
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


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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


def sweep_stale_segments() -> list[str]:
    """Unlink ``pdmesh-<kind>-<pid>-<hex>`` segments whose process is gone (a SIGKILLed tier server leaves its
    pool behind). Segments of live processes, and names without a pid, are left alone. Returns what was removed."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        m = _OWNED.fullmatch(name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive (or not ours to signal: EPERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except OSError:
            pass
    if removed:
        log.info("removed %d stale shared-memory segments of dead processes: %s", len(removed), removed)
    return removed


class SharedSegment:
    """A new segment of ``nbytes`` named ``name``; ``buffer`` is a writable view of all of it.
    ``prefault=True`` touches every page at creation (slower start, no page faults on the data path)."""

    def __init__(self, name: str, nbytes: int, *, prefault: bool = False) -> None:
        self.name = name
        self.nbytes = nbytes
        path = segment_path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
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
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        self._unlinker = weakref.finalize(self, _unlink_quiet, path)
        self.buffer = memoryview(self._mmap)
        if prefault:
            zeros = bytes(min(nbytes, 1 << 22))
            for off in range(0, nbytes, len(zeros)):
                n = min(len(zeros), nbytes - off)
                self.buffer[off : off + n] = zeros[:n]

    def close(self) -> None:
        """Unmap and unlink. Views handed out must be released first (else the mapping stays until they are
        garbage collected; the name is unlinked regardless)."""
        try:
            self.buffer.release()
            self._mmap.close()
        except BufferError:
            pass
        self._unlinker()
