"""Stock vLLM NixlConnector PD protocol (pull mode): what the prefill and decode legs carry.

The prefill leg asks vLLM to keep the prompt's KV for a remote decoder (``do_remote_decode``) and to produce a
single token; its response carries ``kv_transfer_params`` (remote engine id, block ids, side-channel host/port)
which the decode leg hands to the decode engine, which then pulls the KV over NIXL. This lets pdmesh front any
plain vLLM PD deployment.
"""

from __future__ import annotations

from pdmesh.router.errors import OpenAIError
from pdmesh.router.openai_requests import one_token_leg


def prefill_request(body: dict) -> dict:
    """The prefill leg: same prompt, one token, no streaming, KV kept for remote decode."""
    leg = one_token_leg(body)
    leg["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    return leg


def decode_request(body: dict, prefill_response: dict) -> dict:
    """The decode leg: the client's request plus the prefill response's ``kv_transfer_params``."""
    params = prefill_response.get("kv_transfer_params")
    if not isinstance(params, dict):
        raise OpenAIError(
            502,
            "prefill worker returned no kv_transfer_params (is it running with NixlConnector as kv producer?)",
            code="PD_PREFILL_BAD_RESPONSE",
            retryable=True,
        )
    leg = dict(body)
    leg["kv_transfer_params"] = params
    return leg
