"""Two "hosts" on one machine: network namespaces joined by a veth pair (iproute2, root only).

:class:`HostPair` owns both namespaces (``close()`` deletes them, which deletes the veth pair too). Host A is
``10.<n>.0.1``, host B ``10.<n>.0.2``; :meth:`HostPair.run` starts a command inside one of them;
:meth:`HostPair.shape` limits the link's rate (and delay, with netem) on both ends; :meth:`HostPair.link_down` cuts the link.
Processes in the two namespaces share the filesystem, ``/dev/shm`` and the hostname (so the ``shm`` transfer
backend still sees "the same host": tests of the network paths name their backend explicitly).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = f"pdm-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetemMissing(RuntimeError):
    """The kernel lacks ``sch_netem`` (no delay emulation); rates still work."""


def _bits(rate: str) -> int:
    """ "10gbit" -> bits per second."""
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, factor in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * factor)
    raise ValueError(f"rate {rate!r}: use kbit, mbit or gbit")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class HostPair:
    def __init__(self, index: int = 0) -> None:
        n = 200 + (os.getpid() + index) % 50
        tag = f"{os.getpid() % 100000}{index}"
        self.ns = {"a": f"pdm-{tag}-a", "b": f"pdm-{tag}-b"}
        self.dev = {"a": f"pa{tag}"[:15], "b": f"pb{tag}"[:15]}
        self.addr = {"a": f"10.{n}.0.1", "b": f"10.{n}.0.2"}
        self._made = False

    def __enter__(self) -> HostPair:
        try:
            for side in ("a", "b"):
                _ip("netns", "add", self.ns[side])
            self._made = True
            _ip("link", "add", self.dev["a"], "type", "veth", "peer", "name", self.dev["b"])
            for side in ("a", "b"):
                _ip("link", "set", self.dev[side], "netns", self.ns[side])
                _ip("-n", self.ns[side], "addr", "add", f"{self.addr[side]}/24", "dev", self.dev[side])
                _ip("-n", self.ns[side], "link", "set", self.dev[side], "up")
                _ip("-n", self.ns[side], "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._made:
            for side in ("a", "b"):
                subprocess.run(["ip", "netns", "del", self.ns[side]], capture_output=True, timeout=30)
            self._made = False

    def argv(self, side: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def run(self, side: str, argv: list[str], **popen: object) -> subprocess.Popen:
        """Start ``argv`` inside host ``side`` (cwd: the repository, so ``tests`` imports work)."""
        return subprocess.Popen(self.argv(side, argv), cwd=REPO, **popen)  # type: ignore[call-overload]

    def shape(self, rate: str, delay: str | None = None) -> None:
        """Both directions: ``rate`` (e.g. "10gbit") and, where the kernel has ``sch_netem``, ``delay`` ("100us").

        Rate alone uses a token bucket (``tbf``), which every kernel here has; a delay needs netem, and
        :class:`NetemMissing` says so when it is not there."""
        for side in ("a", "b"):
            dev = ["-n", self.ns[side], "qdisc", "replace", "dev", self.dev[side], "root"]
            if delay is None:
                bits = _bits(rate)
                burst = max(64 << 10, bits // 8 // 250)  # 4 ms of traffic
                args = [*dev, "tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]
            else:
                args = [*dev, "netem", "rate", rate, "delay", delay]
            done = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                if delay is not None and "unknown" in done.stderr:
                    raise NetemMissing("this kernel has no sch_netem: link delay cannot be emulated")
                raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")

    def unshape(self) -> None:
        for side in ("a", "b"):
            subprocess.run(
                ["tc", "-n", self.ns[side], "qdisc", "del", "dev", self.dev[side], "root"],
                capture_output=True,
            )

    def link_down(self) -> None:
        _ip("-n", self.ns["a"], "link", "set", self.dev["a"], "down")
