"""The prefill side of a push PD request: what is saved and pushed, when, and to whom.

The router asks a prefill worker to compute a prompt (one output token) with
``kv_transfer_params.pdmesh = {transfer_id, push_to, deadline_ms}``. For such a request:

- **what**: every full prompt chunk is saved into the local tier, including chunks vLLM had in its own prefix
  cache or loaded from the tier, because the decode node needs all of them (:attr:`PushPlan.resave_loaded`);
- **when**: each engine step that completes chunks saves them and asks for one push of exactly those chunks
  (chunked prefill completes a long prompt over several steps, so one request may make several pushes);
- **to whom**: the decode node's transfer receiver named by ``push_to``. Each push has its own transfer id,
  ``{transfer_id}.{n}`` (a transfer id is committed once on the receiver), and the request's deadline. With
  ``push_to_device`` (the decode worker's device landing, ``pdmesh.connector.device_landing``) a prefill worker
  whose device path is on writes there first and to ``push_to`` when the landing cannot take the chunks;
  without its device path, ``push_to_device`` is ignored (the tier server pushes to ``push_to``).

Pure: no I/O, no vLLM. The connector's scheduler half calls :meth:`PushPlan.next_push`; the worker half saves the
chunks and hands the :class:`PushSpec` to the tier server, which runs the push in the background
(``pdmesh.kvcache`` ``push`` op -> ``pdmesh.transfer.sender``). A failed push only makes the decoder compute.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PushSpec:
    """Send the chunks just saved to another node's tier."""

    transfer_id: str  # unique per push: "{request transfer id}.{n}"
    peer: str  # "host:port" of the decode node's transfer receiver
    deadline_s: float  # seconds from now that the push may take
    device_peer: str | None = None  # "host:port" of the decode worker's device landing, when it has one


class PushPlan:
    """One prefill request's pushes. Not thread-safe (vLLM's scheduler thread owns it)."""

    resave_loaded = True  # loaded chunks are saved again: the peer needs every chunk, not only computed ones

    def __init__(
        self, transfer_id: str, push_to: str, deadline_s: float, push_to_device: str | None = None
    ) -> None:
        self.transfer_id = transfer_id
        self.push_to = push_to
        self.push_to_device = push_to_device
        self.deadline_s = deadline_s
        self.pushes = 0

    def next_push(self) -> PushSpec:
        """The push of the chunks saved in this step."""
        self.pushes += 1
        return PushSpec(
            f"{self.transfer_id}.{self.pushes}", self.push_to, self.deadline_s, self.push_to_device
        )

    def report(self) -> dict:
        """What the prefill response's ``kv_transfer_params.pdmesh`` says."""
        return {"transfer_id": self.transfer_id}
