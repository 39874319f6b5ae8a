"""The connector's typed config: one parser of kv_connector_extra_config, strict, with clear errors."""

from __future__ import annotations

import pytest

from pdmesh.connector.config import ConnectorConfig, ConnectorConfigError


def test_defaults_and_environment_fallbacks():
    cfg = ConnectorConfig.load({}, block_size=128, env={})
    assert cfg.chunk == 128 and cfg.save_generated is False and cfg.tier_socket is None
    assert cfg.transfer_fingerprint == "pdmesh-kv-v1" and not cfg.device_staging
    env = {"PDMESH_TIER_SOCKET": "/run/t.sock", "PDMESH_TIER_TRANSFER_FINGERPRINT": "fp-2"}
    cfg = ConnectorConfig.load({"tier_socket": ""}, block_size=16, env=env)
    assert cfg.socket() == "/run/t.sock" and cfg.transfer_fingerprint == "fp-2" and cfg.chunk == 16
    # the config wins over the environment
    assert ConnectorConfig.load({"tier_socket": "/a"}, 16, env).socket() == "/a"


@pytest.mark.parametrize(
    ("raw", "expected"), [(False, False), ("false", False), ("0", False), ("true", True)]
)
def test_booleans_mean_what_they_say(raw, expected):
    """The string "false" is False (``bool("false")`` was True before this config existed)."""
    assert ConnectorConfig.load({"save_generated": raw}, 128, env={}).save_generated is expected


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"chunk_tokens": 100}, "multiple of the engine's block size 128"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"save_generatd": True}, "save_generatd"),  # a typo is an error, not a silent default
        ({"save_generated": "maybe"}, "save_generated"),
        ({"tier_timeout_s": -1}, "tier_timeout_s"),
        ({"device_staging_slots": 0}, "device_staging_slots"),
    ],
)
def test_bad_values_stop_the_engine_with_every_problem_named(extra, message):
    with pytest.raises(ConnectorConfigError, match=message):
        ConnectorConfig.load(extra, 128, env={})


def test_no_socket_is_an_error_only_where_one_is_needed():
    cfg = ConnectorConfig.load({"chunk_tokens": 256}, 128, env={})
    assert cfg.chunk == 256
    with pytest.raises(ConnectorConfigError, match="tier_socket"):
        cfg.socket()
