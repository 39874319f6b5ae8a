"""Triton implementation of pack/unpack: one kernel launch for all layers, planes and blocks.

The kernel reads each layer's base address from an int64 **pointer table** (``data_ptr()`` of every layer's
cache), so layers may live in separate allocations (vLLM <= 0.x allocates one tensor per layer). Program ids:
axis 0 enumerates ``(layer, plane, i)`` in chunk order, axis 1 strides over tiles of ``BLOCK`` words of one
plane. Words are the widest of 8/4/2/1 bytes that divides every address, stride and plane size, so bf16/fp8
caches are copied as int64 words just like fp32 ones (bytes verbatim; no dtype-specific code).

Device selection: CUDA tensors use the compiled kernel (``triton.jit``). CPU tensors run the same kernel under
Triton's interpreter (``InterpretedFunction``, what ``TRITON_INTERPRET=1`` selects): host pointers are real
addresses there, so the pointer table works as on a GPU. This is for testing only (it is slow).
``TRITON_INTERPRET=1`` with CUDA tensors is refused: the interpreter copies tensors to the host, which would leave
the pointer table pointing at device memory.

Asynchronous on CUDA (queued on the current stream); synchronous in the interpreter.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from pdmesh.kernels.errors import KernelError
from pdmesh.kernels.layouts import LayerGeometry

try:  # Triton ships with vLLM (GPU and CPU builds); the torch path works without it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    HAVE_TRITON = False


class TritonUnavailable(KernelError, RuntimeError):
    """Triton is not importable, or cannot run on these tensors."""


def _copy_kernel(
    table_ptr,  # int64[L]: base address of each layer's cache
    buf_ptr,  # chunk buffer (uint8 tensor); addressed in WORD units
    ids_ptr,  # int64[n]: block ids in chunk order
    n,  # number of blocks in the chunk
    block_stride,  # in words
    plane_stride,  # in words
    plane_words,  # words per plane of one block
    P: tl.constexpr,
    WORD: tl.constexpr,
    BLOCK: tl.constexpr,
    PACK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    ntiles = tl.num_programs(1)
    i = pid % n
    lp = pid // n  # layer * P + plane
    plane = lp % P
    layer = lp // P
    base = tl.load(table_ptr + layer).to(tl.pointer_type(WORD))
    block = tl.load(ids_ptr + i)
    cache = base + block * block_stride + plane * plane_stride
    chunk = buf_ptr.to(tl.pointer_type(WORD)) + pid * plane_words
    for start in range(tile * BLOCK, plane_words, ntiles * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < plane_words
        if PACK:
            tl.store(chunk + offs, tl.load(cache + offs, mask=mask), mask=mask)
        else:
            tl.store(cache + offs, tl.load(chunk + offs, mask=mask), mask=mask)


@functools.cache
def _kernel(interpreted: bool) -> Any:
    if not HAVE_TRITON:
        raise TritonUnavailable("triton is not installed")
    if interpreted:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_copy_kernel)
    return triton.jit(_copy_kernel)


_WORD_TYPES = {8: "int64", 4: "int32", 2: "int16", 1: "uint8"}


def _word_bytes(values: Sequence[int]) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    for w in (8, 4, 2):
        if g % w == 0:
            return w
    return 1


def _run(
    pack: bool,
    caches: Sequence[torch.Tensor],
    geo: LayerGeometry,
    ids_tensor: torch.Tensor,
    buf: torch.Tensor,
    interpreted: bool | None = None,
) -> None:
    """Launch the kernel once. ``interpreted=None``: Triton's interpreter for CPU tensors, compiled otherwise;
    ``False`` uses ``triton.jit`` (which itself interprets when ``TRITON_INTERPRET=1``)."""
    dev = caches[0].device
    if interpreted is None:
        interpreted = dev.type == "cpu"
    if dev.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise TritonUnavailable("TRITON_INTERPRET=1 cannot run the pointer-table kernel on CUDA tensors")
    n = int(ids_tensor.numel())
    if n == 0 or not caches:
        return
    ptrs = [c.data_ptr() for c in caches]
    word = _word_bytes([*ptrs, buf.data_ptr(), geo.block_stride, geo.plane_stride or 8, geo.plane_nbytes])
    table = torch.tensor(ptrs, dtype=torch.int64).to(dev, non_blocking=True)
    plane_words = geo.plane_nbytes // word
    block = min(1024 if dev.type == "cuda" else 256, triton.next_power_of_2(plane_words))
    tiles = min(triton.cdiv(plane_words, block), 64)
    grid = (len(caches) * geo.num_planes * n, tiles)
    _kernel(interpreted)[grid](
        table,
        buf,
        ids_tensor,
        n,
        geo.block_stride // word,
        geo.plane_stride // word,
        plane_words,
        P=geo.num_planes,
        WORD=getattr(tl, _WORD_TYPES[word]),
        BLOCK=block,
        PACK=pack,
    )


def pack(
    caches: Sequence[torch.Tensor], geo: LayerGeometry, ids_tensor: torch.Tensor, buf: torch.Tensor
) -> None:
    """Gather blocks ``ids_tensor`` (int64, on the caches' device) of all layers into ``buf`` (contiguous uint8,
    device-accessible: same device, or pinned host memory for CUDA caches) in chunk format."""
    _run(True, caches, geo, ids_tensor, buf)


def unpack(
    buf: torch.Tensor, caches: Sequence[torch.Tensor], geo: LayerGeometry, ids_tensor: torch.Tensor
) -> None:
    """Scatter the chunk ``buf`` into blocks ``ids_tensor`` of all layers; other blocks are untouched."""
    _run(False, caches, geo, ids_tensor, buf)
