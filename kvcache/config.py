"""TierConfig: the tier server's configuration (YAML file + ``PDMESH_TIER_*`` environment overrides).

Every field maps to one environment variable: ``PDMESH_TIER_<FIELD>`` for top-level fields and
``PDMESH_TIER_<SECTION>_<FIELD>`` for nested ones (``PDMESH_TIER_POOL_BYTES=512MiB``,
``PDMESH_TIER_DISK_ENABLED=true``, ``PDMESH_TIER_REMOTE_URL=redis://127.0.0.1:6379/0``). Byte sizes accept
integers or strings with a unit (``KiB MiB GiB TiB``, ``KB MB GB``). Precedence: defaults < YAML < environment <
explicit overrides. Invalid input raises :class:`TierConfigError` naming the field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pdmesh.kvcache.errors import KVCacheError

ENV_PREFIX = "PDMESH_TIER_"
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


class TierConfigError(KVCacheError, ValueError):
    """Invalid tier configuration (the message names the field or variable)."""


def parse_size(value: Any) -> int:
    """``1048576``, ``"1MiB"``, ``"1.5 GB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '256MiB'")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size (examples: 1048576, '256MiB', '1GiB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


Size = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DiskConfig(_Strict):
    enabled: bool = False
    path: str = "~/.cache/pdmesh/tier"
    max_bytes: Size = 1 << 30
    fsync: bool = True
    spill: bool = True  # chunks evicted from memory are written to disk
    write_through: bool = False  # every committed chunk is also written to disk


class RemoteConfig(_Strict):
    url: str | None = None  # redis://host:port/db or pdmesh://host:port
    timeout_s: float = Field(2.0, gt=0)
    connect_timeout_s: float = Field(0.5, gt=0)
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_s: float = Field(2.0, gt=0)
    write_through: bool = True  # committed chunks are also put to the remote (in the background)
    lookup: bool = True  # /lookup and control lookups also ask the remote for the prefix
    ttl_s: int | None = Field(None, ge=1)  # Redis: chunks expire after this many seconds (None: never)

    @model_validator(mode="after")
    def _check_url(self) -> RemoteConfig:
        if self.url and not re.match(r"^(redis|rediss|unix|pdmesh)://", self.url):
            raise ValueError(f"url {self.url!r} must start with redis://, rediss://, unix:// or pdmesh://")
        return self


def default_backends() -> list[str]:
    """``shm, nixl, tcp`` where NIXL is installed, else ``shm, tcp``. Only looks the package up (importing NIXL
    pulls in torch, which the storage layers never load); a NIXL that cannot start is dropped when the tier
    builds its backends."""
    import importlib.util

    return ["shm", "nixl", "tcp"] if importlib.util.find_spec("nixl") is not None else ["shm", "tcp"]


class TransferConfig(_Strict):
    """PD push between tier servers (see kvcache/transfer_node.py and docs/transfer.md)."""

    enabled: bool = False
    host: str = "127.0.0.1"  # receiver bind address
    port: int = Field(0, ge=0, le=65535)  # 0 = any free port
    advertise_host: str | None = None  # what peers dial (default: host)
    # In order of preference; the sender takes the first one the peer offers that connects (shm only works on the
    # same host). Default: shm, then NIXL/UCX when it is installed (UCX picks RDMA/NVLink/TCP itself), then our
    # TCP. Env: PDMESH_TIER_TRANSFER_BACKENDS=nixl,tcp (comma separated).
    backends: list[str] = Field(default_factory=lambda: default_backends())
    fingerprint: str = "pdmesh-kv-v1"  # peers with another value are refused at handshake

    @field_validator("backends", mode="before")
    @classmethod
    def _comma_list(cls, v: object) -> object:
        return [b.strip() for b in v.split(",") if b.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_backends(self) -> TransferConfig:
        from pdmesh.transfer.registry import known

        bad = [b for b in self.backends if b not in known()]
        if bad or not self.backends:
            raise ValueError(
                f"backends must be a non-empty list of {', '.join(known())} (got {self.backends})"
            )
        return self


class TierConfig(_Strict):
    host: str = "127.0.0.1"
    http_port: int = Field(8300, ge=0, le=65535)  # 0 = pick a free port
    socket_path: str | None = None  # unix control socket; default /tmp/pdmesh-tier-<pid>.sock
    token: str | None = None  # cluster token; default from PDMESH_CLUSTER_TOKEN
    pool_bytes: Size = 256 << 20
    slot_bytes: Size = 2 << 20  # one chunk per slot: >= the model's chunk size
    chunk_tokens: int = Field(256, gt=0)
    prefault: bool = True  # touch the whole pool at start (no page faults on the data path)
    lease_grace_s: float = Field(1.0, ge=0)
    reap_interval_s: float = Field(0.5, gt=0)
    inflight_wait_s: float = Field(0.5, ge=0)  # a load waits this long for a chunk still being written
    segment_name: str | None = None  # shared-memory segment name (pdmesh-...); default generated
    fingerprint: dict[str, Any] | None = None  # ModelFingerprint fields, for /lookup by token ids
    disk: DiskConfig = DiskConfig()
    remote: RemoteConfig = RemoteConfig()
    transfer: TransferConfig = TransferConfig()
    log_level: str = "info"

    @model_validator(mode="after")
    def _check(self) -> TierConfig:
        if self.slot_bytes > self.pool_bytes:
            raise ValueError(f"slot_bytes ({self.slot_bytes}) is larger than pool_bytes ({self.pool_bytes})")
        if self.fingerprint is not None:
            from pdmesh.kvcache.keys import ModelFingerprint

            try:
                ModelFingerprint.from_dict(self.fingerprint)
            except TypeError as e:
                raise ValueError(f"fingerprint: {e}") from e
        return self

    @property
    def num_slots(self) -> int:
        return self.pool_bytes // self.slot_bytes

    def resolved_socket_path(self) -> str:
        return self.socket_path or f"/tmp/pdmesh-tier-{os.getpid()}.sock"

    def resolved_token(self) -> str:
        if self.token is not None:
            return self.token
        from pdmesh.security import cluster_token_from_env

        return cluster_token_from_env()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> TierConfig:
        """Defaults < YAML file ``path`` < ``PDMESH_TIER_*`` variables of ``env`` (default os.environ) <
        ``overrides`` (dotted names allowed as ``disk__enabled``). Raises TierConfigError."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise TierConfigError(f"cannot read tier config {path}: {e}") from e
            try:
                loaded = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise TierConfigError(f"{path}: invalid YAML: {e}") from e
            if not isinstance(loaded, dict):
                raise TierConfigError(f"{path}: the top level must be a mapping")
            data = loaded.get("tier", loaded) if isinstance(loaded.get("tier"), dict) else loaded
        for dotted, value in _env_values(os.environ if env is None else env).items():
            _set(data, dotted, value)
        for name, value in overrides.items():
            if value is not None:
                _set(data, name.replace("__", "."), value)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            msgs = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'tier'}: {err['msg']}" for err in e.errors()
            )
            raise TierConfigError(f"invalid tier config: {msgs}") from e

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, env: dict[str, str] | None = None) -> TierConfig:
        return cls.load(path, env)


def _env_names() -> dict[str, str]:
    """PDMESH_TIER_* variable -> dotted field name."""
    names: dict[str, str] = {}
    for name, field in TierConfig.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for child in sub.model_fields:
                names[f"{ENV_PREFIX}{name}_{child}".upper()] = f"{name}.{child}"
        else:
            names[f"{ENV_PREFIX}{name}".upper()] = name
    return names


def _env_values(env: dict[str, str]) -> dict[str, str]:
    known = _env_names()
    out = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        if var not in known:
            raise TierConfigError(f"unknown variable {var}; known: {', '.join(sorted(known))}")
        out[known[var]] = value
    return out


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    if isinstance(value, str) and parts[-1] == "fingerprint":
        value = yaml.safe_load(value)
    node[parts[-1]] = value
