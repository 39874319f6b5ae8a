"""When NIXL's agent runs UCX's progress thread (:func:`pdmesh.transfer.nixl_backend.progress_thread_wanted`), how
many agents (lanes) a backend runs (:func:`~pdmesh.transfer.nixl_backend.lanes_wanted`) and how a push's segments
are split over them."""

from __future__ import annotations

import itertools

import pytest

from pdmesh.transfer import nixl_backend
from pdmesh.transfer.backend import Segment
from pdmesh.transfer.nixl_backend import NixlConfig, _split, lanes_wanted, progress_thread_wanted


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
        ("lo", False, None, None, 1),  # one host: cma in the initiator's call
        ("lo", False, "3", None, 3),  # PDMESH_NIXL_LANES forces it
        ("eth0", False, "3", 1, 1),  # an explicit config wins
    ],
)
def test_two_lanes_where_ucx_reaches_other_hosts_only_over_tcp(
    monkeypatch, tmp_path, devices, rdma, forced, configured, lanes
):
    ib = tmp_path / "infiniband"
    ib.mkdir()
    if rdma:
        (ib / "mlx5_0").mkdir()
    monkeypatch.setattr(nixl_backend, "RDMA_DEVICES", str(ib))
    monkeypatch.delenv("PDMESH_NIXL_PROG_THREAD", raising=False)
    for name, value in (("UCX_NET_DEVICES", devices), ("PDMESH_NIXL_LANES", forced)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert lanes_wanted(NixlConfig(lanes=configured)) == lanes


@pytest.mark.parametrize(
    "lengths, lanes",
    [([1536] * 64, 2), ([1536] * 64, 3), ([100, 1, 1, 1, 1, 100], 2), ([5], 4), ([1, 2, 3, 4, 5, 6, 7], 7)],
)
def test_a_push_splits_into_contiguous_runs_of_about_equal_bytes(lengths, lanes):
    segments = [Segment(0, n, 0) for n in lengths]
    runs = _split(len(segments), lanes, segments)
    assert len(runs) <= min(lanes, len(segments))
    if len(set(lengths)) == 1:  # equal chunks, as a worker's push: every lane gets a run
        assert len(runs) == min(lanes, len(segments))
    assert runs[0].start == 0 and runs[-1].stop == len(segments)
    assert all(a.stop == b.start for a, b in itertools.pairwise(runs))  # contiguous, no overlap
    assert all(r.stop > r.start for r in runs)
    per_run = [sum(lengths[r]) for r in runs]
    assert max(per_run) - min(per_run) <= max(lengths)  # balanced to within one segment
