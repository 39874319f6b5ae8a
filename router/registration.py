"""Wire schema of worker registration (``POST /internal/workers``), owned by the router.

Workers send the same document as registration and as heartbeat; the router answers with the heartbeat
interval it expects. ``DELETE /internal/workers/{worker_id}`` deregisters.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pdmesh.router.leg_target import BadTarget, parse_target

Role = Literal["prefill", "decode", "both"]
WORKER_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


class WorkerRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker_id: str = Field(min_length=1, max_length=128, pattern=WORKER_ID_PATTERN)
    role: Role
    # Base URL of the worker's OpenAI server, e.g. http://10.0.0.5:8100
    url: str = Field(min_length=1, max_length=512)
    # Served model names: the base model's and every LoRA adapter's the engine serves now.
    models: list[str] = Field(min_length=1, max_length=1024)
    # Which of ``models`` are LoRA adapters (their KV is keyed by the adapter's weights, which only the engine
    # knows: the router does not ask tiers about them).
    adapters: list[str] = Field(default_factory=list, max_length=1024)
    max_model_len: int | None = Field(default=None, gt=0)
    # Engine's KV block size (tokens), for cache-aware routing.
    block_size: int | None = Field(default=None, gt=0)
    # Address of the worker's tier server HTTP API, when it runs one.
    tier_url: str | None = None
    # host:port of the worker's KV transfer receiver (push PD mode): where prefill workers push chunks.
    transfer_address: str | None = Field(
        default=None, max_length=300, pattern=r"^[A-Za-z0-9_.:\[\]-]+:[0-9]+$"
    )
    # host:port of the decode worker's device landing (its vLLM process's receiver into device memory registered
    # with NIXL; connector/device_landing.py), when the device path is on: prefill workers with theirs on push there.
    device_transfer_address: str | None = Field(
        default=None, max_length=300, pattern=r"^[A-Za-z0-9_.:\[\]-]+:[0-9]+$"
    )
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        try:
            parse_target(v)
        except BadTarget as e:
            raise ValueError(str(e)) from None
        return v.rstrip("/")


class RegistrationReply(BaseModel):
    worker_id: str
    heartbeat_interval_s: float
    ttl_s: float
