"""pdmesh push PD protocol: what the prefill and decode legs carry (docs/architecture.md, "A request, step by step").

The router picks the decode worker D first, then asks a prefill worker P to compute the prompt with one output
token and push its KV chunks into D's tier (``push_to`` = D's transfer receiver). D's connector finds the
chunks by their keys; those still in flight make D wait, up to ``deadline_ms``, then it computes whatever did
not arrive. So a lost push costs time, never correctness.

Only the router sets these fields (client-supplied ``kv_transfer_params`` are dropped at the edge).
"""

from __future__ import annotations

from collections.abc import Sequence

from pdmesh.router.openai_requests import one_token_leg
from pdmesh.security import prompt_digest, push_grant


def prefill_request(
    body: dict,
    transfer_id: str,
    push_to: str,
    deadline_ms: int,
    token: str,
    push_to_device: str | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> dict:
    """The prefill leg: same prompt, one token, no streaming, chunks pushed to ``push_to`` under the router's push
    grant (:func:`pdmesh.security.push_grant`: signed with the cluster token, expiring, used once, bound to the
    prompt's token ids when the router knows them (``prompt_ids``)): the prefill worker's connector pushes nowhere
    else, and a leaked grant pushes nothing else. ``push_to_device``: D's device landing (its registration's
    ``device_transfer_address``), signed under its own label as ``sig_device``; a prefill worker with the device
    path on writes there first (docs/transfer.md, "Device memory"). Call once per attempt: each call is a new
    grant."""
    leg = one_token_leg(body)
    prompt = None
    if prompt_ids is not None:
        try:
            prompt = prompt_digest(prompt_ids)
        except ValueError:
            prompt = None  # ids vLLM will refuse anyway: the leg fails on its own
    grant = push_grant(token, transfer_id, push_to, deadline_ms, prompt, push_to_device)
    leg["kv_transfer_params"] = {"pdmesh": grant}
    return leg


def decode_request(body: dict, transfer_id: str, deadline_ms: int) -> dict:
    """The decode leg on the worker the chunks were pushed to: wait for them (bounded), then generate."""
    return {
        **body,
        "kv_transfer_params": {"pdmesh": {"transfer_id": transfer_id, "deadline_ms": deadline_ms}},
    }
