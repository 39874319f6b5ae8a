"""Typed errors of the transfer layer.

Every failure that crosses the transfer API is a :class:`TransferError` with a stable ``code`` (one of the
``PD_*`` strings below, also sent on the wire in ERROR frames) and a ``retryable`` flag: whether the same
operation may succeed when tried again. The transfer layer itself never retries; its callers decide.
"""

from __future__ import annotations

PD_PEER_UNAVAILABLE = "PD_PEER_UNAVAILABLE"
PD_TRANSFER_TIMEOUT = "PD_TRANSFER_TIMEOUT"
PD_TRANSFER_FAILED = "PD_TRANSFER_FAILED"
PD_INCOMPATIBLE_PEER = "PD_INCOMPATIBLE_PEER"

CODES = (PD_PEER_UNAVAILABLE, PD_TRANSFER_TIMEOUT, PD_TRANSFER_FAILED, PD_INCOMPATIBLE_PEER)


class TransferError(Exception):
    """Base class. ``code`` is one of :data:`CODES`; ``retryable`` says whether the same request may be retried."""

    code: str = PD_TRANSFER_FAILED
    default_retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_wire(self) -> dict:
        """The ERROR frame body for this error."""
        return {"op": "error", "code": self.code, "message": self.message, "retryable": self.retryable}


class PeerUnavailable(TransferError):
    """The peer cannot be reached or went away (connection refused, reset, closed)."""

    code = PD_PEER_UNAVAILABLE
    default_retryable = True


class TransferTimeout(TransferError):
    """A deadline passed before the step finished. Nothing the caller holds stays pinned."""

    code = PD_TRANSFER_TIMEOUT
    default_retryable = True


class TransferFailed(TransferError):
    """The transfer failed for another reason (backend error, lease expired, pool full, bad request)."""

    code = PD_TRANSFER_FAILED
    default_retryable = False


class IncompatiblePeer(TransferError):
    """Handshake refused: other compatibility fingerprint, protocol version, cluster token or no common backend."""

    code = PD_INCOMPATIBLE_PEER
    default_retryable = False


class PoolExhausted(TransferFailed):
    """The receiving pool has no free region right now (retryable: leases expire, chunks get consumed)."""

    default_retryable = True


_BY_CODE: dict[str, type[TransferError]] = {
    cls.code: cls for cls in (PeerUnavailable, TransferTimeout, TransferFailed, IncompatiblePeer)
}


def error_from_wire(frame: dict) -> TransferError:
    """Rebuild a typed error from an ERROR frame (unknown codes become TransferFailed)."""
    cls = _BY_CODE.get(str(frame.get("code")), TransferFailed)
    return cls(str(frame.get("message", "")), retryable=bool(frame.get("retryable", False)))
