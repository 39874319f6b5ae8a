"""The exception root of :mod:`pdmesh.kernels`: every error the kernels raise is a :class:`KernelError` (and,
where it fits, also the builtin a caller would expect: ``ValueError`` for a bad layout or buffer, ``IndexError``
for a block id out of range, ``RuntimeError`` when Triton cannot run)."""

from __future__ import annotations


class KernelError(Exception):
    """Any error raised by the pack/unpack kernels."""
