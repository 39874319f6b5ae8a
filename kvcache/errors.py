"""The exception root of :mod:`pdmesh.kvcache`: every error the tier raises is a :class:`KVCacheError`.

Errors that belong to one module are defined there (``PoolFull`` in ``pool``, ``CorruptRecord`` in ``record``,
``ControlError`` in ``control_ops``, ...) as subclasses of this root; the remote tiers' errors live here because
both remote clients and the guard share them.
"""

from __future__ import annotations


class KVCacheError(Exception):
    """Any error raised by the KV cache tier."""


class RemoteError(KVCacheError):
    """A remote tier failed (connection, timeout, protocol or server error)."""


class RemoteUnavailable(RemoteError):
    """The remote is down or its circuit breaker is open."""
