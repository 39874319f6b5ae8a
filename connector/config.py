"""The connector's typed configuration: every key of ``kv_connector_extra_config``, validated once at engine start.

``ConnectorConfig.load(extra, block_size)`` is the only reader of the raw dict (and of the environment fallbacks
``PDMESH_TIER_SOCKET`` and ``PDMESH_TIER_TRANSFER_FINGERPRINT``). Unknown keys, wrong types and out-of-range values
raise :class:`ConnectorConfigError` with every problem named, so a typo stops the engine with a clear message
instead of being ignored; booleans accept JSON booleans and the usual strings (``"false"`` is False).

Keys:

- ``tier_socket``: the local tier server's unix socket (env ``PDMESH_TIER_SOCKET``); required by the halves that
  talk to it.
- ``chunk_tokens``: tokens per chunk, a positive multiple of the engine's block size (default: one block). The
  connector tells its tier at hello, so the tier's ``/lookup`` by token ids (the router's) uses the same size.
- ``save_generated``: also save chunks of generated tokens (multi-turn reuse), default False.
- ``tier_timeout_s`` (3.0), ``tier_load_timeout_s`` (10.0): bounds of control calls and of one load.
- ``transfer_fingerprint``: the transfer format the device path presents (env
  ``PDMESH_TIER_TRANSFER_FINGERPRINT``; default: the tier servers' default).
- ``device_staging`` (False), ``device_staging_slots`` (64), ``device_landing`` ("host:port"),
  ``device_landing_advertise_host``: the device path (:mod:`pdmesh.connector.device_path`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdmesh.kvcache.config import TransferConfig

SOCKET_ENV = "PDMESH_TIER_SOCKET"
TRANSFER_FP_ENV = "PDMESH_TIER_TRANSFER_FINGERPRINT"
DEFAULT_TRANSFER_FINGERPRINT: str = TransferConfig.model_fields["fingerprint"].default


class ConnectorConfigError(ValueError):
    """``kv_connector_extra_config`` is invalid; the message names every problem."""


class ConnectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tier_socket: str | None = None
    chunk_tokens: int | None = Field(default=None, gt=0)
    save_generated: bool = False
    tier_timeout_s: float = Field(default=3.0, gt=0, le=600)
    tier_load_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    transfer_fingerprint: str = Field(default=DEFAULT_TRANSFER_FINGERPRINT, min_length=1)
    device_staging: bool = False
    device_staging_slots: int = Field(default=64, gt=0)
    device_landing: str | None = None
    device_landing_advertise_host: str | None = None

    @classmethod
    def load(
        cls, extra: Mapping[str, Any] | None, block_size: int, env: Mapping[str, str] | None = None
    ) -> ConnectorConfig:
        """Validate ``extra`` (the engine's ``kv_connector_extra_config``) for an engine of ``block_size``; fill
        the environment fallbacks and the chunk size. Raises :class:`ConnectorConfigError`."""
        env = os.environ if env is None else env
        raw = dict(extra or {})
        for key in ("tier_socket", "device_landing", "device_landing_advertise_host", "transfer_fingerprint"):
            if raw.get(key) == "":
                raw.pop(key)  # an empty string is "not set", as the launchers write it
        if "tier_socket" not in raw and env.get(SOCKET_ENV):
            raw["tier_socket"] = env[SOCKET_ENV]
        if "transfer_fingerprint" not in raw and env.get(TRANSFER_FP_ENV):
            raw["transfer_fingerprint"] = env[TRANSFER_FP_ENV]
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors()
            )
            raise ConnectorConfigError(f"pdmesh connector: kv_connector_extra_config: {problems}") from None
        chunk = cfg.chunk_tokens or block_size
        if chunk % block_size:
            raise ConnectorConfigError(
                f"pdmesh connector: kv_connector_extra_config.chunk_tokens {chunk} must be a multiple of the "
                f"engine's block size {block_size}"
            )
        return cfg.model_copy(update={"chunk_tokens": chunk})

    @property
    def chunk(self) -> int:
        """Tokens per chunk (set by :meth:`load`)."""
        assert self.chunk_tokens is not None
        return self.chunk_tokens

    def socket(self) -> str:
        """The tier socket; :class:`ConnectorConfigError` when none is configured."""
        if not self.tier_socket:
            raise ConnectorConfigError(
                f"pdmesh connector: set kv_connector_extra_config.tier_socket or {SOCKET_ENV}"
            )
        return self.tier_socket
