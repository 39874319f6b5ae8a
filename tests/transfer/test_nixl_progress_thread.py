"""When NIXL's agent runs UCX's progress thread (:func:`pdmesh.transfer.nixl_agent.progress_thread_wanted`), how
many agents (lanes) a backend runs (:func:`~pdmesh.transfer.nixl_agent.lanes_wanted`) and how a push's segments
are split over them."""

from __future__ import annotations

import os
import time

import pytest

from pdmesh.transfer import nixl_agent, nixl_backend
from pdmesh.transfer.backend import Segment
from pdmesh.transfer.nixl_backend import NixlConfig, _lane_rows, lanes_wanted, progress_thread_wanted


@pytest.mark.parametrize(
    "devices, forced, configured, wanted",
    [
        ("lo", None, None, False),  # one host: cma copies in the initiator's call, the thread only competes
        ("eth0", None, None, True),  # between hosts: TCP needs progress on both sides
        (None, None, None, True),  # UCX picks the devices: may be another host
        (" lo ", None, None, False),
        ("lo,eth0", None, None, True),
        ("lo", "1", None, True),  # PDMESH_NIXL_PROG_THREAD forces it
        ("eth0", "0", None, False),
        ("eth0", "0", True, True),  # an explicit config wins over the environment
        ("lo", None, False, False),
    ],
)
def test_progress_thread_only_where_a_peer_can_be_on_another_host(
    monkeypatch, devices, forced, configured, wanted
):
    for name, value in (("UCX_NET_DEVICES", devices), ("PDMESH_NIXL_PROG_THREAD", forced)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert progress_thread_wanted(NixlConfig(enable_prog_thread=configured)) is wanted


@pytest.mark.parametrize(
    "devices, rdma, forced, configured, lanes",
    [
        ("eth0", False, None, None, 2),  # TCP between hosts: a second UCX connection and progress thread
        (None, False, None, None, 2),
        ("eth0", True, None, None, 1),  # an RDMA device: one agent already uses every rail
        ("lo", False, None, None, 2),  # one host: cma copies in each lane's posting thread, in parallel
        ("lo", False, "3", None, 3),  # PDMESH_NIXL_LANES forces it
        ("eth0", False, "3", 1, 1),  # an explicit config wins
    ],
)
def test_two_lanes_unless_the_host_has_rdma(monkeypatch, tmp_path, devices, rdma, forced, configured, lanes):
    ib = tmp_path / "infiniband"
    ib.mkdir()
    if rdma:
        (ib / "mlx5_0").mkdir()
    monkeypatch.setattr(nixl_agent, "RDMA_DEVICES", str(ib))
    monkeypatch.delenv("PDMESH_NIXL_PROG_THREAD", raising=False)
    for name, value in (("UCX_NET_DEVICES", devices), ("PDMESH_NIXL_LANES", forced)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert lanes_wanted(NixlConfig(lanes=configured)) == lanes


@pytest.mark.parametrize(
    "lengths, lanes",
    [([1536] * 64, 2), ([1536] * 64, 3), ([100, 1, 1, 1, 1, 100], 2), ([40, 60], 2), ([10, 10, 80], 3), ([5], 4),
     ([3], 7), ([0, 4, 0], 2)],
)  # fmt: skip
def test_a_push_splits_into_contiguous_runs_of_equal_bytes(lengths, lanes):
    segments, off = [], 0
    for n in lengths:
        segments.append(Segment(off, n, 1000 + off))
        off += n
    rows = _lane_rows(segments, lanes)
    total = sum(lengths)
    assert len(rows) == min(lanes, total)
    per_lane = [sum(n for _, n, _ in lane) for lane in rows]
    assert sum(per_lane) == total and max(per_lane) - min(per_lane) <= 1  # equal to the byte
    flat = [row for lane in rows for row in lane]
    pos = 0
    for lo, n, ro in flat:  # in order, contiguous, every byte once, remote offsets follow local ones
        assert lo == pos and ro == 1000 + lo and n > 0
        pos += n
    assert pos == total


class _FakeAgent:
    """Just enough of a ``nixl_agent`` to drive a backend's lanes: ``fail_post`` makes ``transfer`` raise,
    ``polls`` says how many checks a transfer stays in progress."""

    def __init__(self, name: str, fail_post: bool = False, polls: int = 2) -> None:
        self.name, self.fail_post, self.polls = name, fail_post, polls
        self.open: dict[int, int] = {}
        self.posted: list[int] = []  # bytes per WRITE posted
        self.removed: list[str] = []  # remote agents removed

    def register_memory(self, regions, mem_type):
        return ("reg", self.name)

    def deregister_memory(self, reg):
        pass

    def get_agent_metadata(self) -> bytes:
        return self.name.encode()

    def add_remote_agent(self, md: bytes) -> bytes:
        return md

    def remove_remote_agent(self, name):
        self.removed.append(name)

    def get_xfer_descs(self, rows, mem_type):
        return rows

    def initialize_xfer(self, op, local, remote, peer, notif):
        handle = len(self.posted) + 1000 * len(self.name)
        self.posted.append(int(local[:, 1].sum()))
        self.open[handle] = self.polls
        return handle

    def transfer(self, handle):
        if self.fail_post:
            raise RuntimeError("lane broken")
        return "PROC"

    def check_xfer_state(self, handle):
        self.open[handle] -= 1
        return "PROC" if self.open[handle] > 0 else "DONE"

    def release_xfer_handle(self, handle):
        del self.open[handle]

    def get_new_notifs(self):
        return {}


def test_lanes_share_a_push_and_a_broken_lane_leaves_the_peer_on_one(monkeypatch):
    agents: dict[str, _FakeAgent] = {}

    def make(name, config):
        agents[name] = _FakeAgent(name)
        return agents[name]

    monkeypatch.setattr(nixl_backend, "make_agent", make)
    tx, rx = (
        nixl_backend.NixlBackend("fp", NixlConfig(lanes=2)),
        nixl_backend.NixlBackend("fp", NixlConfig(lanes=2)),
    )
    buf = memoryview(bytearray(1 << 20))
    tx.register_memory(buf)
    rx.register_memory(memoryview(bytearray(1 << 20)))
    peer = tx.connect(rx.local_metadata())
    segments = [Segment(i * 4096, 4096, i * 4096) for i in range(8)]
    lane0, lane1 = (agents[a] for a in sorted(agents) if a.startswith(tx.agent_name))
    tx.wait(tx.write(peer, segments, b"n"), time.monotonic() + 5)
    assert lane0.posted == [16384] and lane1.posted == [16384]  # half each
    assert not lane0.open and not lane1.open  # every handle released
    lane1.fail_post = True
    tx.wait(tx.write(peer, segments, b"n"), time.monotonic() + 5)
    assert lane0.posted[-1] == 32768 and not lane0.open and not lane1.open  # all of it over lane 0
    assert len(lane1.removed) == 1 and not lane0.removed  # the dropped lane's remote agent is unloaded
    tx.wait(tx.write(peer, segments, b"n"), time.monotonic() + 5)
    assert len(lane1.posted) == 2 and lane0.posted[-1] == 32768  # the peer stays on one lane
    tx.close()
    rx.close()


@pytest.mark.parametrize(
    "devices, operator, ucx_env, override, wanted",
    [
        (
            "eth0",
            None,
            {},
            False,
            "y",
        ),  # progress thread: the worker lock is a mutex (no spinning through syscalls)
        ("lo", None, {}, False, None),  # one host, no progress thread: UCX's own default
        ("eth0", "n", {}, False, "n"),  # an operator's UCX_USE_MT_MUTEX wins over ours
        ("eth0", None, {"UCX_USE_MT_MUTEX": "n"}, False, "n"),  # so does the config's ucx_env
        ("eth0", "y", {"UCX_USE_MT_MUTEX": "n"}, False, "y"),  # ... which yields to the environment
        ("eth0", "y", {"UCX_USE_MT_MUTEX": "n"}, True, "n"),  # ... unless it overrides it
        (None, None, {"UCX_NET_DEVICES": "lo"}, False, None),  # ucx_env applies before the thread is decided
    ],
)
def test_ucx_env_then_the_progress_threads_defaults_unless_already_set(
    monkeypatch, devices, operator, ucx_env, override, wanted
):
    monkeypatch.delenv("PDMESH_NIXL_PROG_THREAD", raising=False)
    for name, value in (("UCX_NET_DEVICES", devices), ("UCX_USE_MT_MUTEX", operator)):
        monkeypatch.setenv(name, "")  # recorded, so that what apply_ucx_env sets is undone after the test
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    nixl_agent.apply_ucx_env(NixlConfig(ucx_env=ucx_env, override_env=override))
    assert os.environ.get("UCX_USE_MT_MUTEX") == wanted
