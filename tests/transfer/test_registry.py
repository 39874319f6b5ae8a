"""The transfer backend registry (pdmesh.transfer.registry): names, the error for an unknown one, each factory
building its backend from the options, ``available()``, and the typed write handles the backends return."""

from __future__ import annotations

import dataclasses
import time
from types import MappingProxyType

import pytest

from pdmesh.kvcache import transfer_node
from pdmesh.kvcache.pool import ChunkPool
from pdmesh.kvcache.transfer_node import TransferNode
from pdmesh.transfer import nixl_backend, registry, segment
from pdmesh.transfer.backend import Segment, TransferBackend, WriteHandle
from pdmesh.transfer.nixl_backend import NixlBackend, NixlConfig, NixlWrite
from pdmesh.transfer.reference_pool import ReferencePool
from pdmesh.transfer.registry import BackendOptions, UnknownBackend
from pdmesh.transfer.shm_backend import ShmBackend, ShmWrite
from pdmesh.transfer.tcp_backend import TcpBackend, TcpWrite

FP = "reg-fp"


class _Agent:
    """Just enough of a nixl_agent for a NixlBackend to be built and closed."""

    def __init__(self, name: str, config: NixlConfig) -> None:
        self.name, self.config = name, config


@pytest.fixture
def fake_nixl(monkeypatch):
    """NixlBackend without NIXL: agents are stand-ins, the process environment is left alone."""
    made: list[_Agent] = []

    def make(name, config):
        made.append(_Agent(name, config))
        return made[-1]

    monkeypatch.setattr(nixl_backend, "make_agent", make)
    monkeypatch.setattr(nixl_backend, "apply_ucx_env", lambda config: None)
    return made


def test_known_names_and_each_maps_to_a_backend_of_that_name():
    assert registry.known() == ("nixl", "shm", "tcp")
    assert registry.backend_class("shm") is ShmBackend
    assert registry.backend_class("tcp") is TcpBackend
    assert registry.backend_class("nixl") is NixlBackend
    for name in registry.known():
        assert registry.backend_class(name).name == name


@pytest.mark.parametrize("name", ["ucx", "", "SHM", None])
def test_an_unknown_name_raises_a_value_error_listing_the_known_ones(name):
    for call in (
        lambda: registry.build(name, BackendOptions(FP)),
        lambda: registry.available(name),
        lambda: registry.factories(["tcp", name], BackendOptions(FP)),
    ):
        with pytest.raises(UnknownBackend) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert repr(name) in str(info.value) and "known: nixl, shm, tcp" in str(info.value)


def test_the_tier_node_checks_its_backend_names_through_the_registry():
    with pytest.raises(UnknownBackend, match=r"'udp'.*known: nixl, shm, tcp"):
        transfer_node._factories(FP, "t", "127.0.0.1", "127.0.0.1", ["tcp", "udp"])
    pool = ChunkPool(4096, 1)
    try:
        with pytest.raises(ValueError, match="unknown transfer backend 'udp'"):
            TransferNode(pool, FP, "t", backends=["tcp", "udp"])
    finally:
        pool.close()


def test_shm_is_built_with_the_fingerprint():
    b = registry.build("shm", BackendOptions(FP, token="ignored"))
    try:
        assert isinstance(b, ShmBackend) and b.fingerprint == FP
    finally:
        b.close()


def test_tcp_is_built_with_token_bind_host_and_advertised_host():
    b = registry.build("tcp", BackendOptions(FP, token="s3", host="0.0.0.0", advertise_host="[10.0.0.7]"))
    d = registry.build("tcp", BackendOptions(FP))
    try:
        assert isinstance(b, TcpBackend)
        assert (b.fingerprint, b.token, b.host, b.advertise_host) == (FP, "s3", "0.0.0.0", "10.0.0.7")
        assert (d.token, d.host, d.advertise_host) == (
            "",
            "127.0.0.1",
            "127.0.0.1",
        )  # advertised: the bind host
    finally:
        b.close()
        d.close()


def test_nixl_is_built_with_its_config_or_the_defaults(fake_nixl):
    cfg = NixlConfig(ucx_env={"UCX_TLS": "tcp"}, lanes=2)
    b = registry.build("nixl", BackendOptions(FP, nixl=cfg))
    d = registry.build("nixl", BackendOptions(FP, nixl=NixlConfig(lanes=1)))
    try:
        assert isinstance(b, NixlBackend) and b.fingerprint == FP and b.config is cfg
        assert b.lanes == 2 and all(a.config is cfg for a in fake_nixl[:2])
        assert d.lanes == 1
    finally:
        b.close()
        d.close()
    plain = registry.build("nixl", BackendOptions(FP))
    try:
        assert plain.config == NixlConfig()
    finally:
        plain.close()


def test_factories_keep_the_order_check_names_now_and_build_a_new_backend_per_call():
    opts = BackendOptions(FP, token="tk")
    made = registry.factories(["tcp", "shm", "tcp"], opts)
    assert list(made) == ["tcp", "shm"]
    one, two = made["tcp"](), made["tcp"]()
    try:
        assert one is not two and isinstance(one, TcpBackend) and one.token == "tk"
    finally:
        one.close()
        two.close()


def test_available_asks_each_backend_and_is_false_when_its_module_cannot_import(monkeypatch, tmp_path):
    assert registry.available("tcp") is True
    assert registry.available("shm") is True
    monkeypatch.setattr(segment, "SHM_DIR", str(tmp_path / "no-shm"))
    assert registry.available("shm") is False
    monkeypatch.setattr(nixl_backend, "nixl_available", lambda: False)
    assert registry.available("nixl") is False
    monkeypatch.setattr(nixl_backend, "nixl_available", lambda: True)
    assert registry.available("nixl") is True
    entries = {**registry.BACKENDS, "gone": "pdmesh.transfer.no_such_backend:GoneBackend"}
    monkeypatch.setattr(registry, "BACKENDS", MappingProxyType(entries))
    assert registry.known() == ("gone", "nixl", "shm", "tcp")
    assert registry.available("gone") is False
    with pytest.raises(ImportError):
        registry.build("gone", BackendOptions(FP))


def test_a_registry_line_must_name_a_backend_class_of_that_name(monkeypatch):
    entries = {**registry.BACKENDS, "fast": "pdmesh.transfer.tcp_backend:TcpBackend"}
    monkeypatch.setattr(registry, "BACKENDS", MappingProxyType(entries))
    with pytest.raises(TypeError, match="fast"):
        registry.backend_class("fast")


def test_a_backend_only_built_directly_refuses_options():
    class Direct(TransferBackend[WriteHandle]):
        name = "direct"

        def register_memory(self, buffer, segment_name=None):
            pass

        def local_metadata(self):
            return b""

        def connect(self, peer_metadata):
            return "p"

        def write(self, peer, segments, notif):
            return WriteHandle(peer)

        def wait(self, handle, deadline):
            pass

        def close(self):
            pass

    assert Direct.available() is True
    assert Direct(FP).write("p", [], b"") == WriteHandle("p")
    with pytest.raises(NotImplementedError):
        Direct.from_options(BackendOptions(FP))


def test_write_handles_are_typed_frozen_and_waited_on_by_their_backend():
    pool = ReferencePool(4096, 1)
    src = memoryview(bytearray(b"\x07" * 4096))
    rx, tx = ShmBackend(FP), registry.build("shm", BackendOptions(FP))
    try:
        rx.register_memory(pool.buffer, pool.segment_name)
        tx.register_memory(src)
        peer = tx.connect(rx.local_metadata())
        handle = tx.write(peer, [Segment(0, 4096, 0)], b"n")
        assert isinstance(handle, ShmWrite) and isinstance(handle, WriteHandle) and handle.peer == peer
        with pytest.raises(dataclasses.FrozenInstanceError):
            handle.peer = "other"  # type: ignore[misc]
        tx.wait(handle, time.monotonic() + 5)
        assert bytes(pool.buffer[:4096]) == b"\x07" * 4096
    finally:
        tx.close()
        rx.close()
        pool.close()
    for cls in (ShmWrite, TcpWrite, NixlWrite):
        assert issubclass(cls, WriteHandle) and dataclasses.fields(cls)[0].name == "peer"
    done = NixlWrite("p", xfers=[], status="DONE")
    assert (done.peer, done.xfers, done.status) == ("p", [], "DONE")
