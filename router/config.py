"""Router configuration: a pydantic model loaded from YAML and ``PDMESH_ROUTER_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdmesh.security import cluster_token_from_env


class RouterConfig(BaseModel):
    """Everything the router needs. Unknown keys are errors (typos must not pass silently)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # push: pdmesh connector + tier push (default); nixl: stock vLLM NixlConnector pull protocol.
    pd_mode: Literal["push", "nixl"] = "push"
    # push mode: how long a decode worker waits for pushed chunks before computing the rest.
    pd_transfer_deadline_ms: int = Field(5000, ge=0, le=600_000)
    # Workers are dropped when no heartbeat arrived for this long.
    heartbeat_ttl_s: float = Field(10.0, gt=0)
    # A worker whose connection failed is skipped for this long (or until its next heartbeat after that).
    failure_cooldown_s: float = Field(5.0, ge=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    # Upper bound for one upstream leg (prefill, or the whole decode stream).
    request_timeout_s: float = Field(600.0, gt=0)
    # Attempts per leg before the first byte reached the client (other workers first).
    max_attempts: int = Field(3, ge=1, le=10)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    # Public API keys (Authorization: Bearer ...). Empty: no client auth.
    api_keys: list[str] = Field(default_factory=list)
    # Token for internal endpoints (worker registration). Empty: allowed only on loopback binds.
    cluster_token: str = Field(default_factory=cluster_token_from_env)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class ConfigError(ValueError):
    """A configuration file or variable is invalid; the message names the field."""


_ENV_PREFIX = "PDMESH_ROUTER_"


def load_router_config(path: str | os.PathLike[str] | None = None, **overrides: object) -> RouterConfig:
    """Merge, lowest first: defaults, YAML file, ``PDMESH_ROUTER_<FIELD>`` env vars, explicit overrides.

    List fields in env vars are comma separated. Raises :class:`ConfigError` with a readable message.
    """
    data: dict[str, object] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read router config {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"router config {path} must be a mapping")
        data.update(loaded.get("router", loaded))
    for name, field in RouterConfig.model_fields.items():
        raw = os.environ.get(_ENV_PREFIX + name.upper())
        if raw is None:
            continue
        data[name] = [s for s in raw.split(",") if s] if field.annotation == list[str] else raw
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid router config:\n" + "\n".join(lines)) from None
