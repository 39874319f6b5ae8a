"""What the router reads out of a worker's JSON completion: prompt tokens used, and the decode worker's report
(``kv_transfer_params.pdmesh``) on whether the pushed KV arrived before the deadline."""

from __future__ import annotations

import json
import logging

import msgspec

from pdmesh.router.metrics import RouterMetrics

log = logging.getLogger("pdmesh.router")


def usage_prompt_tokens(content: bytes | None) -> int:
    """``usage.prompt_tokens`` of a JSON completion body; 0 when absent or unparsable."""
    if not content:
        return 0
    try:
        n = msgspec.json.decode(content, type=_UsageOnly).usage.prompt_tokens
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0
    return n if n > 0 else 0


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0


class _UsageOnly(msgspec.Struct):
    usage: _Usage = msgspec.field(default_factory=_Usage)


def count_transfer_fallback(metrics: RouterMetrics, content: bytes, request_id: str) -> None:
    """Count (and log) a decode leg whose pushed KV missed the deadline, as its worker reports it."""
    if b"fallback" not in content:
        return
    try:
        report = (json.loads(content).get("kv_transfer_params") or {}).get("pdmesh") or {}
    except (ValueError, AttributeError):
        return
    if report.get("fallback") is not True:
        return
    metrics.pd_requests.labels("transfer_fallback").inc()
    log.warning("request %s: pushed KV missed the deadline; the decode worker computed the rest", request_id)
