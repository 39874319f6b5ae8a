"""pdmesh push PD protocol: what the prefill and decode legs carry (design.md, "PD request flow").

The router picks the decode worker D first, then asks a prefill worker P to compute the prompt with one output
token and push its KV chunks into D's tier (``push_to`` = D's transfer receiver). D's connector finds the
chunks by their keys; those still in flight make D wait, up to ``deadline_ms``, then it computes whatever did
not arrive. So a lost push costs time, never correctness.

Only the router sets these fields (client-supplied ``kv_transfer_params`` are dropped at the edge).
"""

from __future__ import annotations

from pdmesh.router.openai_requests import one_token_leg
from pdmesh.security import sign_push_target


def prefill_request(
    body: dict,
    transfer_id: str,
    push_to: str,
    deadline_ms: int,
    token: str,
    push_to_device: str | None = None,
) -> dict:
    """The prefill leg: same prompt, one token, no streaming, chunks pushed to ``push_to``, which the router
    vouches for with ``sig`` (HMAC of ``{transfer_id, push_to, deadline_ms}`` keyed by the cluster token): the
    prefill worker's connector pushes nowhere else. ``push_to_device``: D's device landing (its registration's
    ``device_transfer_address``), signed the same way as ``sig_device``; a prefill worker with the device path on
    writes there first (docs/transfer.md, "Device memory")."""
    leg = one_token_leg(body)
    sig = sign_push_target(token, transfer_id, push_to, deadline_ms)
    pd = {"transfer_id": transfer_id, "push_to": push_to, "deadline_ms": deadline_ms, "sig": sig}
    if push_to_device:
        pd["push_to_device"] = push_to_device
        pd["sig_device"] = sign_push_target(token, transfer_id, push_to_device, deadline_ms)
    leg["kv_transfer_params"] = {"pdmesh": pd}
    return leg


def decode_request(body: dict, transfer_id: str, deadline_ms: int) -> dict:
    """The decode leg on the worker the chunks were pushed to: wait for them (bounded), then generate."""
    return {
        **body,
        "kv_transfer_params": {"pdmesh": {"transfer_id": transfer_id, "deadline_ms": deadline_ms}},
    }
