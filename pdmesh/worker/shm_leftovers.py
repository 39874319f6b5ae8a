"""Shared-memory segments a killed vLLM leaves behind, and their removal.

vLLM's API server, engine core and workers talk through POSIX shared memory (Python's
``multiprocessing.shared_memory``: files ``/dev/shm/psm_*``, up to a few hundred MiB each; on CPU, tensor-parallel
workers also share ``vllm_dist_*`` segments). A clean stop unlinks them; a process that is SIGKILLed (a stop past
its timeout, a crash, an operator's ``kill -9``) cannot, and tmpfs keeps them until reboot. The owner of an engine
calls :func:`remove_orphans` once the engine's processes are gone.

Contract: a segment is removed only when it is (1) named with one of :data:`PREFIXES` in :data:`SHM_DIR`, (2) owned
by this user (the
only ones this process may unlink in the sticky ``/dev/shm``, and whose users' ``/proc`` entries it can read),
(3) created or changed at or after ``since`` (the engine's start: older ones belong to someone else's
lifetime), and (4) neither open nor mapped by any live process (``/proc/*/fd`` and ``/proc/*/maps``). A segment
another live engine uses is therefore never touched. Blocking (a ``/proc`` scan: milliseconds); never raises.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("pdmesh.worker")

SHM_DIR = "/dev/shm"
PREFIXES = ("psm_", "vllm_dist_")


def segments_in_use(shm_dir: str = SHM_DIR) -> set[str]:
    """Paths under ``shm_dir`` that some live process has open or mapped (as far as ``/proc`` shows this user)."""
    used: set[str] = set()
    prefix = shm_dir.rstrip("/") + "/"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    i = line.find(prefix)
                    if i >= 0:
                        used.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:
            pass  # gone, or not ours to read
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith(prefix):
                    used.add(target)
        except OSError:
            pass
    return used


def remove_orphans(since: float, shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink this user's segments named with :data:`PREFIXES` changed at or after ``since`` (wall-clock seconds)
    that no live process has open or mapped; returns their names. See the module docstring for the rules."""
    candidates: list[Path] = []
    try:
        for path in Path(shm_dir).iterdir():
            if not path.name.startswith(PREFIXES):
                continue
            try:
                st = path.stat()
            except OSError:
                continue  # unlinked meanwhile
            if st.st_uid == os.getuid() and max(st.st_ctime, st.st_mtime) >= since:
                candidates.append(path)
    except OSError as e:
        log.debug("shared-memory leftovers: cannot list %s: %s", shm_dir, e)
        return []
    if not candidates:
        return []
    used = segments_in_use(shm_dir)
    removed: list[str] = []
    for path in candidates:
        if str(path) in used:
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            pass
    if removed:
        log.info(
            "removed %d shared-memory segment(s) a stopped vLLM left: %s", len(removed), ", ".join(removed)
        )
    return removed
