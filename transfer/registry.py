"""The transfer backends by name: the one way a backend is built from configuration.

:data:`BACKENDS` maps each name (what ``transfer.backends`` and ``SenderConfig.backends`` list, and what the
handshake offers) to the :class:`~pdmesh.transfer.backend.TransferBackend` subclass implementing it, as
``"module:Class"``. A module is imported only when its backend is asked for (never at import of this module: no
NIXL, no numpy). Adding a backend = one module (a ``TransferBackend`` subclass with a unique ``name``,
``from_options`` and, when it has optional dependencies, ``available``) + one line in :data:`BACKENDS`.

* :func:`build` (``name``, :class:`BackendOptions`) -> a new backend; :func:`factories` -> ``{name: factory}`` as
  ``Sender`` takes them (each factory builds a new backend when called, with the same options);
* :func:`available` (``name``) -> whether it can start in this process (e.g. NIXL importable), building nothing;
* :func:`known` -> the names; any other name raises :class:`UnknownBackend` (a ValueError) listing them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from types import MappingProxyType

from pdmesh.transfer.backend import BackendOptions, TransferBackend

__all__ = [
    "BACKENDS",
    "BackendOptions",
    "UnknownBackend",
    "available",
    "backend_class",
    "build",
    "factories",
    "known",
]

BACKENDS: Mapping[str, str] = MappingProxyType(
    {
        "shm": "pdmesh.transfer.shm_backend:ShmBackend",
        "nixl": "pdmesh.transfer.nixl_backend:NixlBackend",
        "tcp": "pdmesh.transfer.tcp_backend:TcpBackend",
    }
)

Factory = Callable[[], TransferBackend]


class UnknownBackend(ValueError):
    """A backend name that is not in :data:`BACKENDS` (the message lists the known ones)."""

    def __init__(self, name: object) -> None:
        super().__init__(f"unknown transfer backend {name!r} (known: {', '.join(known())})")
        self.name = name


def known() -> tuple[str, ...]:
    """The registered backend names, sorted."""
    return tuple(sorted(BACKENDS))


def backend_class(name: str) -> type[TransferBackend]:
    """The class implementing backend ``name`` (imports its module). Raises :class:`UnknownBackend`; an
    ImportError of the module (a missing dependency) propagates."""
    target = BACKENDS.get(name) if isinstance(name, str) else None
    if target is None:
        raise UnknownBackend(name)
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, TransferBackend)) or cls.name != name:
        raise TypeError(f"registry entry {name!r} -> {target} is not a TransferBackend named {name!r}")
    return cls


def available(name: str) -> bool:
    """Whether backend ``name`` can start in this process (its module and its dependencies import); builds
    nothing. Raises :class:`UnknownBackend` for a name not registered."""
    try:
        cls = backend_class(name)
    except ImportError:
        return False
    return cls.available()


def build(name: str, options: BackendOptions) -> TransferBackend:
    """A new backend ``name`` built from ``options``. Raises :class:`UnknownBackend`; errors of starting it
    (ImportError, NIXL without a usable transport, ...) propagate."""
    return backend_class(name).from_options(options)


def factories(names: Iterable[str], options: BackendOptions) -> dict[str, Factory]:
    """``{name: factory}`` for ``names`` in order (a repeated name once), each factory building a new backend from
    ``options`` when called (for ``Sender``, which builds lazily). Every name is checked and its module imported
    now: :class:`UnknownBackend` or an ImportError raise here, not at the first push."""
    out: dict[str, Factory] = {}
    for name in names:
        out[name] = partial(backend_class(name).from_options, options)
    return out
