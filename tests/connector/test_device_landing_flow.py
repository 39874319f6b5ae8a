"""How a push reaches a decode worker's device landing (no NIXL needed): the decode worker registers its
``device_transfer_address``, the router names it as ``push_to_device`` (signed like ``push_to``), the prefill
connector's push plan carries it, and the decode connector's scheduler half counts landed chunks as ready."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the connector imports vLLM's connector base classes")

from pdmesh.connector.config import ConnectorConfig
from pdmesh.connector.device_path import DevicePathConfig
from pdmesh.connector.params import PdParams
from pdmesh.connector.scheduler import ConnectorScheduler
from pdmesh.kvcache.keys import chunk_keys
from pdmesh.router.pd_push import prefill_request
from pdmesh.router.registration import WorkerRegistration
from tests.connector.test_connector_scheduler import (
    FP,
    TOKEN,
    C,
    Clock,
    FakeRequest,
    FakeTier,
    new_req_output,
)

PROMPT = list(range(1, 26))  # 3 loadable chunks of 8 tokens


def _device_config(extra: dict) -> DevicePathConfig:
    """The device path's part of a kv_connector_extra_config, parsed the one way the connector does."""
    return DevicePathConfig.from_config(ConnectorConfig.load(extra, block_size=1, env={}))


def _scheduler(landed_keys: set[bytes]):
    tier, clock = FakeTier(), Clock()
    s = ConnectorScheduler(
        tier,
        lambda toks, n, ident: chunk_keys(FP, toks[: n * C], C, ident),
        C,
        4,
        False,
        clock,
        token=TOKEN,
        landed=lambda keys: [k in landed_keys for k in keys],
    )
    return s, tier, clock


def test_the_router_signs_the_landing_and_the_prefill_push_plan_carries_it():
    leg = prefill_request({"prompt": "x"}, "t1", "10.0.0.2:7000", 5000, TOKEN, "10.0.0.2:7100")
    params = leg["kv_transfer_params"]
    pd = PdParams.from_request(params, TOKEN)
    assert pd is not None and pd.push_to == "10.0.0.2:7000" and pd.push_to_device == "10.0.0.2:7100"
    s, _, _ = _scheduler(set())
    req = FakeRequest("r", PROMPT, params)
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, [1, 2, 3, 4, 5, 6, 7], 0)
    (save,) = s.build_meta(new_req_output(req, [1, 2, 3, 4, 5, 6, 7], 0, 25)).saves
    assert (save.push.peer, save.push.device_peer) == ("10.0.0.2:7000", "10.0.0.2:7100")
    # without a landing the leg is what it always was
    plain = prefill_request({"prompt": "x"}, "t1", "10.0.0.2:7000", 5000, TOKEN)["kv_transfer_params"][
        "pdmesh"
    ]
    assert (
        "push_to_device" not in plain
        and PdParams.from_request({"pdmesh": plain}, TOKEN).push_to_device is None
    )


def test_an_unsigned_or_forged_landing_is_dropped_alone():
    good = prefill_request({}, "t1", "10.0.0.2:7000", 5000, TOKEN, "10.0.0.2:7100")["kv_transfer_params"][
        "pdmesh"
    ]
    for forged in (
        {**good, "push_to_device": "6.6.6.6:1"},  # the signature is for another address
        {**good, "sig_device": None},
        {**good, "sig_device": good["sig"]},  # push_to's signature does not vouch for another address
        {**good, "push_to_device": 7},
    ):
        pd = PdParams.from_request({"pdmesh": forged}, TOKEN)
        assert pd is not None and pd.push_to == "10.0.0.2:7000" and pd.push_to_device is None, forged
    # a decode leg (no push_to) never carries one
    decode = {"transfer_id": "t1", "push_to_device": "10.0.0.2:7100", "sig_device": good["sig_device"]}
    assert PdParams.from_request({"pdmesh": decode}, TOKEN).push_to_device is None


def test_the_decode_workers_registration_advertises_its_landing():
    reg = WorkerRegistration(
        worker_id="d", role="decode", url="http://h:1", models=["m"], device_transfer_address="10.0.0.2:7100"
    )
    assert reg.device_transfer_address == "10.0.0.2:7100"
    assert (
        WorkerRegistration(
            worker_id="d", role="decode", url="http://h:1", models=["m"]
        ).device_transfer_address
        is None
    )
    with pytest.raises(ValueError):
        WorkerRegistration(
            worker_id="d", role="decode", url="http://h:1", models=["m"], device_transfer_address="x y"
        )


def test_landed_chunks_count_as_ready_for_a_waiting_decode_leg():
    keys = chunk_keys(FP, PROMPT, C)
    landed: set[bytes] = set()
    s, tier, clock = _scheduler(landed)
    req = FakeRequest("r", PROMPT, {"pdmesh": {"transfer_id": "t1", "deadline_ms": 5000}})
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    landed.update(keys[:2])  # two chunks landed on the device, none in the tier yet
    clock.t = 1.0
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    tier.ready = {keys[0]}  # the first one's host copy is in the tier too; the third landed
    landed.add(keys[2])
    clock.t = 2.0
    assert s.get_num_new_matched_tokens(req, 0) == (24, False)  # no compute wait for the host copies
    assert s.stats.pd_fallbacks == 0


def test_landed_chunks_after_a_gap_do_not_count():
    keys = chunk_keys(FP, PROMPT, C)
    s, _tier, clock = _scheduler({keys[1], keys[2]})
    req = FakeRequest("r", PROMPT, {"pdmesh": {"transfer_id": "t1", "deadline_ms": 500}})
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    clock.t = 1.0  # deadline: chunk 0 never came, so nothing loads
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    assert s.stats.pd_fallbacks == 1


def test_the_landing_flag_parses():
    cfg = _device_config(
        {
            "device_staging": True,
            "device_landing": "0.0.0.0:7100",
            "device_landing_advertise_host": "10.0.0.2",
        }
    )
    assert (cfg.enabled, cfg.landing, cfg.landing_advertise_host) == (True, "0.0.0.0:7100", "10.0.0.2")
    assert _device_config({}).landing is None


def test_the_worker_launch_turns_the_device_path_on_only_with_cuda_and_nixl(monkeypatch):
    """``pdmesh prefiller|decoder``: auto (default) is off on CPU whatever NIXL says, so the CPU path and its
    kv-transfer-config are unchanged; on CUDA with NIXL it is on, decoders also bind a device landing."""
    import pdmesh.transfer.nixl_backend as nb
    from pdmesh.worker.agent import device_path_wanted, kv_transfer_config
    from pdmesh.worker.roles import ROLES

    monkeypatch.delenv("PDMESH_DEVICE_STAGING", raising=False)
    assert device_path_wanted("cpu")[0] is False
    monkeypatch.setattr(nb, "nixl_available", lambda: True)
    assert device_path_wanted("cuda")[0] is True
    assert device_path_wanted("cuda", "off")[0] is False
    monkeypatch.setattr(nb, "nixl_available", lambda: False)
    use, why = device_path_wanted("cuda")
    assert not use and "NIXL" in why
    decode, prefill = ROLES["decode"], ROLES["prefill"]
    cpu = kv_transfer_config(decode, "push", "cpu", "/t.sock", 128)
    assert cpu["kv_connector_extra_config"] == {
        "tier_socket": "/t.sock",
        "save_generated": True,
        "chunk_tokens": 128,
    }
    gpu = kv_transfer_config(decode, "push", "cuda", "/t.sock", 16, True, ("0.0.0.0:7100", "10.0.0.2"))
    extra = gpu["kv_connector_extra_config"]
    assert extra["device_staging"] is True and extra["device_landing"] == "0.0.0.0:7100"
    assert extra["device_landing_advertise_host"] == "10.0.0.2"
    pre = kv_transfer_config(prefill, "push", "cuda", "/t.sock", 16, True)["kv_connector_extra_config"]
    assert pre["device_staging"] is True and "device_landing" not in pre


def test_the_facade_starts_no_landing_for_cpu_caches_even_when_asked():
    """On CPU the facade leaves the landing off (the caches are not on CUDA): pushes land in the tier pool."""
    from types import SimpleNamespace

    from pdmesh.connector.config import ConnectorConfig
    from pdmesh.connector.vllm_connector import PdmeshConnector
    from pdmesh.kernels import bind, get_layout
    from tests.connector.test_connector_worker import caches

    extra = {"device_staging": True, "device_landing": "127.0.0.1:0"}
    fake = SimpleNamespace(config=ConnectorConfig.load(extra, 128, env={}), shards=1)
    assert PdmeshConnector._device_landing(fake, bind(caches(1), get_layout("cpu_attn")), 2) is None
    fake.tier = SimpleNamespace(address="/run/t.sock")
    assert PdmeshConnector._landed_lookup(fake)([b"a"]) == [False]  # no landing in this process
    fake.config = ConnectorConfig.load({"device_staging": True}, 128, env={})
    assert PdmeshConnector._landed_lookup(fake) is None
