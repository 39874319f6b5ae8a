"""Shared-memory segments a killed vLLM leaves behind, and their removal.

vLLM's API server, engine core and workers talk through POSIX shared memory (Python's
``multiprocessing.shared_memory``: files ``/dev/shm/psm_*``, up to a few hundred MiB each; on CPU, tensor-parallel
workers also share ``vllm_dist_*`` segments, which they never unlink). A clean stop unlinks the others; a process
that is SIGKILLed (a stop past its timeout, a crash, an operator's ``kill -9``) cannot, and tmpfs keeps them until
reboot.

How an owner uses it: :func:`segments_of` the engine's processes while they run (after it became healthy, and
again just before stopping it), then, once they are gone, :func:`remove_orphans` of those segments. Only segments
the engine itself had open or mapped are ever candidates, so a segment of another engine, even one this process
cannot see (another PID namespace sharing ``/dev/shm``), is never touched. A candidate is removed only when it is
(1) named with one of :data:`PREFIXES` in :data:`SHM_DIR`, (2) owned by this user (the only ones this process may
unlink in the sticky ``/dev/shm``) and (3) neither open nor mapped by any live process this process can see
(``/proc/*/fd``, ``/proc/*/maps``: a TP worker sharing it with a sibling that still runs keeps it). Blocking (a
``/proc`` scan: milliseconds); never raises.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

log = logging.getLogger("pdmesh.worker")

SHM_DIR = "/dev/shm"
PREFIXES = ("psm_", "vllm_dist_")


def _segments_of_pid(pid: str, prefix: str) -> set[str]:
    found: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                i = line.find(prefix)
                if i >= 0:
                    found.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
    except OSError:
        pass  # gone, or not ours to read
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith(prefix):
                found.add(target.removesuffix(" (deleted)"))
    except OSError:
        pass
    return found


def segments_of(pids: Iterable[int], shm_dir: str = SHM_DIR) -> set[str]:
    """Paths under ``shm_dir`` that the processes ``pids`` have open or mapped now."""
    prefix = shm_dir.rstrip("/") + "/"
    out: set[str] = set()
    for pid in pids:
        out |= _segments_of_pid(str(pid), prefix)
    return out


def segments_in_use(shm_dir: str = SHM_DIR) -> set[str]:
    """Paths under ``shm_dir`` that some live process has open or mapped (as far as ``/proc`` shows this user)."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return set()
    return segments_of(pids, shm_dir)


def remove_orphans(segments: Iterable[str], shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink those of ``segments`` (paths, as :func:`segments_of` gives them) that the module docstring's rules
    allow; returns the names removed."""
    prefix = shm_dir.rstrip("/") + "/"
    candidates = []
    for path in segments:
        name = path[len(prefix) :] if path.startswith(prefix) else ""
        if not name.startswith(PREFIXES) or "/" in name:
            continue
        try:
            if os.stat(path).st_uid == os.getuid():
                candidates.append(path)
        except OSError:
            continue  # already gone
    if not candidates:
        return []
    used = segments_in_use(shm_dir)
    removed: list[str] = []
    for path in candidates:
        if path in used:
            continue
        try:
            os.unlink(path)
            removed.append(path[len(prefix) :])
        except OSError:
            pass
    if removed:
        log.info(
            "removed %d shared-memory segment(s) a stopped vLLM left: %s", len(removed), ", ".join(removed)
        )
    return sorted(removed)
