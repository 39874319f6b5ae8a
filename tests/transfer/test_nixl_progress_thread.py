"""When NIXL's agent runs UCX's progress thread (:func:`pdmesh.transfer.nixl_backend.progress_thread_wanted`)."""

from __future__ import annotations

import pytest

from pdmesh.transfer.nixl_backend import NixlConfig, progress_thread_wanted


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
