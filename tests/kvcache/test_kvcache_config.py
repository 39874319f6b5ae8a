from __future__ import annotations

import pytest

from pdmesh.kvcache.config import TierConfig, TierConfigError, parse_size


def test_defaults_are_small():
    c = TierConfig.load(None, env={})
    assert c.pool_bytes == 256 << 20 and c.num_slots == 128
    assert not c.disk.enabled and c.remote.url is None


def test_yaml_then_env_then_overrides(tmp_path):
    f = tmp_path / "tier.yaml"
    f.write_text("tier:\n  pool_bytes: 64MiB\n  disk:\n    enabled: true\n    max_bytes: 2GiB\n")
    c = TierConfig.load(
        f, env={"PDMESH_TIER_DISK_MAX_BYTES": "512MiB", "PDMESH_TIER_REMOTE_URL": "redis://h:1/0"}
    )
    assert c.pool_bytes == 64 << 20 and c.disk.enabled and c.disk.max_bytes == 512 << 20
    assert c.remote.url == "redis://h:1/0"
    c = TierConfig.load(f, env={}, pool_bytes="32MiB", disk__enabled=False)
    assert c.pool_bytes == 32 << 20 and not c.disk.enabled


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PDMESH_TIER_POOL_BYTES": "lots"}, "pool_bytes"),
        ({"PDMESH_TIER_REMOTE_URL": "http://x"}, "remote"),
        ({"PDMESH_TIER_NOPE": "1"}, "unknown variable PDMESH_TIER_NOPE"),
        ({"PDMESH_TIER_SLOT_BYTES": "1GiB"}, "slot_bytes"),
        ({"PDMESH_TIER_DISK_ENABLED": "maybe"}, "disk.enabled"),
    ],
)
def test_invalid_config_names_the_field(env, needle):
    with pytest.raises(TierConfigError, match=needle):
        TierConfig.load(None, env=env)


def test_bad_yaml_and_unknown_keys(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("pool_byts: 1\n")
    with pytest.raises(TierConfigError, match="pool_byts"):
        TierConfig.load(f, env={})
    f.write_text("- a\n")
    with pytest.raises(TierConfigError, match="mapping"):
        TierConfig.load(f, env={})
    with pytest.raises(TierConfigError, match="cannot read"):
        TierConfig.load(tmp_path / "missing.yaml", env={})


def test_parse_size():
    assert parse_size("1KiB") == 1024 and parse_size("1.5 GB") == 1_500_000_000 and parse_size(7) == 7
    with pytest.raises(ValueError):
        parse_size("1 parsec")
