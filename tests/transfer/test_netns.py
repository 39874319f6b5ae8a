"""Pushes between two hosts: a sender and a receiver in two network namespaces joined by a veth pair.

Sizes as workers push them: a whole request's chunks in one push (64 chunks of 1.5 MiB, an 8k-token prompt of
the Qwen2.5-0.5B-shaped model). Over our TCP backend and over NIXL/UCX (its TCP transport: the namespaces share
the machine, so UCX would otherwise take shared memory or cma, which says nothing about a network).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time

import pytest

from pdmesh.transfer.nixl_backend import nixl_available
from tests.netns import HostPair, netns_unavailable

_WHY = netns_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")
CHUNK = 1536 << 10
NIXL = pytest.param("nixl", marks=pytest.mark.skipif(not nixl_available(), reason="nixl is not installed"))


def _env(hosts: HostPair, side: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "UCX_TLS": "tcp", "UCX_NET_DEVICES": hosts.dev[side], "PYTHONUNBUFFERED": "1"}
    return {**env, **extra}


def _line(proc: subprocess.Popen, timeout: float) -> dict:
    """The next JSON object line the process prints, within ``timeout`` (NIXL logs to stdout too)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    while True:
        if not sel.select(max(0.0, end - time.monotonic())):
            proc.kill()  # its stderr says where it was stuck
            err = proc.stderr.read()[-3000:] if proc.stderr else ""
            raise AssertionError(f"no answer within {timeout}s; stderr: {err}")
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process ended: {proc.stderr.read()[-3000:] if proc.stderr else ''}")
        if line.startswith("{"):
            return json.loads(line)


class _Receiver:
    def __init__(self, hosts: HostPair, backend: str, **env: str) -> None:
        argv = [sys.executable, "-m", "tests.transfer.netns_peer", "receive", "--host", hosts.addr["b"]]
        self.proc = hosts.run(
            "b", [*argv, "--backend", backend], env=_env(hosts, "b", **env), text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        host, port = _line(self.proc, 120)[
            "address"
        ]  # a cold NIXL agent in a loaded CI: seconds, rarely more
        self.peer = f"{host}:{port}"

    def ask(self, command: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return _line(self.proc, 30)

    def close(self) -> None:
        """Stop it so that it unlinks its pool's shared-memory segment (a SIGKILL would leave it in /dev/shm)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)


def _sender(hosts: HostPair, backend: str, peer: str, *extra: str, **env: str) -> subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "tests.transfer.netns_peer",
        "send",
        "--host",
        hosts.addr["a"],
        "--peer",
        peer,
    ]
    return hosts.run(
        "a", [*argv, "--backend", backend, *extra], env=_env(hosts, "a", **env), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.fixture
def hosts():
    with HostPair() as h:
        yield h


@pytest.mark.parametrize("backend", ["tcp", NIXL])
def test_a_whole_request_push_between_hosts_arrives_intact(hosts, backend):
    rx = _Receiver(hosts, backend)
    try:
        out = _line(_sender(hosts, backend, rx.peer, "--chunks", "64", "--chunk-bytes", str(CHUNK)), 120)
        assert out["ok"] and out["backend"] == backend, out
        assert rx.ask(f"check 1 64 {CHUNK}") == {"intact": True, "present": 64}
    finally:
        rx.close()


@pytest.mark.skipif(not nixl_available(), reason="nixl is not installed")
@pytest.mark.parametrize("sender_lanes, receiver_lanes", [("2", "1"), ("3", "3")])
def test_nixl_pushes_arrive_intact_whatever_lanes_each_side_runs(hosts, sender_lanes, receiver_lanes):
    """A push splits its descriptors over as many lanes (agents, each its own UCX connection) as both sides run;
    a peer with fewer lanes, or none beyond the first, is served over those."""
    rx = _Receiver(hosts, "nixl", PDMESH_NIXL_LANES=receiver_lanes)
    try:
        sender = _sender(hosts, "nixl", rx.peer, "--chunks", "64", "--chunk-bytes", str(CHUNK),
                         PDMESH_NIXL_LANES=sender_lanes)  # fmt: skip
        out = _line(sender, 120)
        assert out["ok"] and out["backend"] == "nixl", out
        assert rx.ask(f"check 1 64 {CHUNK}") == {"intact": True, "present": 64}
    finally:
        rx.close()


def test_link_down_mid_push_fails_within_the_deadline_and_the_leases_are_reclaimed(hosts):
    hosts.shape("200mbit")  # 96 MiB take ~4 s: the link goes down in the middle
    rx = _Receiver(hosts, "tcp")
    try:
        deadline_s = 3.0
        sender = _sender(hosts, "tcp", rx.peer, "--chunks", "64", "--chunk-bytes", str(CHUNK),
                         "--deadline", str(deadline_s))  # fmt: skip
        time.sleep(1.5)
        hosts.link_down()
        out = _line(sender, 60)
        assert not out["ok"] and out["retryable"], out
        assert out["seconds"] < deadline_s + 1.5, out  # the deadline, plus at most the best-effort ABORT
        waited = time.monotonic() + 15  # lease = time left + slack, then the receiver's grace
        stats = rx.ask("stats")
        while (stats["leases"] or stats["leased"]) and time.monotonic() < waited:
            time.sleep(0.5)
            stats = rx.ask("stats")
        assert stats["leases"] == 0 and stats["leased"] == 0 and stats["committed"] == 0, stats
    finally:
        rx.close()
