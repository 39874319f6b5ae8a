from __future__ import annotations

import pytest

from pdmesh.router.config import RouterConfigError, load_router_config


def test_yaml_env_and_overrides_merge(tmp_path, monkeypatch):
    f = tmp_path / "r.yaml"
    f.write_text("router:\n  port: 9001\n  api_keys: [a]\n  heartbeat_ttl_s: 3\n")
    monkeypatch.setenv("PDMESH_ROUTER_HEARTBEAT_TTL_S", "7")
    monkeypatch.setenv("PDMESH_ROUTER_API_KEYS", "x,y")
    cfg = load_router_config(f, host="0.0.0.0")
    assert (cfg.port, cfg.heartbeat_ttl_s, cfg.api_keys, cfg.host) == (9001, 7.0, ["x", "y"], "0.0.0.0")


def test_example_config_is_valid():
    cfg = load_router_config("configs/router.example.yaml")
    defaults = load_router_config()
    # the example documents the defaults: loading it changes nothing
    assert cfg.model_dump(exclude={"cluster_token"}) == defaults.model_dump(exclude={"cluster_token"})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("router:\n  prot: 1\n", "prot"),
        ("router:\n  port: -1\n", "port"),
        ("- a\n", "mapping"),
        ("router: [\n", "cannot read"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, needle):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(RouterConfigError, match=needle):
        load_router_config(f)
