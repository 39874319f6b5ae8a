"""Mutual authentication of transfer peers: both sides prove the cluster token, neither sends it.

A sender connects to an address that travelled in a request, so it must not trust whoever answers, and a receiver
must not trust whoever connects. The handshake (three frames, request/reply alternation kept)::

    sender   -> hello     {..., nonce: Ns}                    # 32 random bytes
    receiver -> challenge {nonce: Nr, proof: P(token, "transfer-receiver", Ns, Nr)}
    sender      checks the receiver's proof (IncompatiblePeer if wrong: nothing more is sent to it)
    sender   -> auth      {proof: P(token, "transfer-sender", Ns, Nr)}
    receiver    checks the sender's proof, then answers the protocol's own reply (e.g. ``hello_ok``)

``P`` is :func:`pdmesh.security.auth_proof` (HMAC-SHA256). Labels differ per side, so a proof can never be
reflected; nonces are fresh per connection, so a recorded proof cannot be replayed. Until ``auth`` checks out the
receiver reads only frames of at most ``PRE_AUTH_MAX_FRAME`` bytes, within ``HELLO_TIMEOUT_S``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from pdmesh.security import NONCE_BYTES, auth_proof, new_nonce, proof_matches
from pdmesh.transfer.errors import IncompatiblePeer, error_from_wire
from pdmesh.transfer.protocol import HELLO_TIMEOUT_S, PRE_AUTH_MAX_FRAME, recv_frame, request, send_frame

_RECEIVER, _SENDER = "transfer-receiver", "transfer-sender"


def client_handshake(
    sock: socket.socket, hello: dict[str, Any], expect: str, token: str, deadline: float
) -> dict[str, Any]:
    """Sender side: send ``hello``, check the peer's proof, prove ours; returns the peer's ``expect`` reply."""
    ns = new_nonce()
    send_frame(sock, {**hello, "nonce": ns}, deadline)
    challenge = recv_frame(sock, deadline, PRE_AUTH_MAX_FRAME)
    if challenge["op"] == "error":
        raise error_from_wire(challenge)
    if challenge["op"] != "challenge":
        raise IncompatiblePeer(
            f"peer answered {challenge['op']!r}, not a challenge: it cannot prove the token"
        )
    nr = challenge.get("nonce")
    if not isinstance(nr, bytes) or len(nr) != NONCE_BYTES:
        raise IncompatiblePeer("peer sent no valid challenge")
    if not proof_matches(challenge.get("proof"), token, _RECEIVER, ns, nr):
        raise IncompatiblePeer("peer did not prove the cluster token")
    return request(sock, {"op": "auth", "proof": auth_proof(token, _SENDER, ns, nr)}, expect, deadline)


def server_handshake(sock: socket.socket, token: str, check_hello: Callable[[dict[str, Any]], None]) -> dict:
    """Receiver side: read ``hello`` (``check_hello`` raises IncompatiblePeer to refuse it), challenge, check the
    peer's proof. Returns the hello; the caller then sends its reply. Bounded by ``HELLO_TIMEOUT_S`` in all."""
    deadline = time.monotonic() + HELLO_TIMEOUT_S
    hello = recv_frame(sock, deadline, PRE_AUTH_MAX_FRAME)
    check_hello(hello)
    ns = hello.get("nonce")
    if not isinstance(ns, bytes) or len(ns) != NONCE_BYTES:
        raise IncompatiblePeer("hello without a valid nonce (an older pdmesh?)")
    nr = new_nonce()
    send_frame(
        sock, {"op": "challenge", "nonce": nr, "proof": auth_proof(token, _RECEIVER, ns, nr)}, deadline
    )
    auth = recv_frame(sock, deadline, PRE_AUTH_MAX_FRAME)
    if auth.get("op") != "auth" or not proof_matches(auth.get("proof"), token, _SENDER, ns, nr):
        raise IncompatiblePeer("peer did not prove the cluster token")
    return hello
