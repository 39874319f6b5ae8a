"""Self-contained bit-exactness harness for pack/unpack on any device (no pytest needed).

Used by ``tests/kernels/test_kernels_cuda.py`` (pytest, CUDA) and by ``bench/bench_gpu.py`` (the GPU check, which
also runs where pytest is not installed, and on CPU under ``--cpu-smoke``). It imports only torch,
``pdmesh.kernels`` and the test helpers in ``kvhelpers`` (no vLLM, NIXL, pytest or hypothesis).

Contract of :func:`check_case`: for one (layout, per-layer shape, dtype), it builds ``num_layers`` caches filled
with random BYTES (NaN bit patterns included) on ``device`` and identical copies on the CPU, then for several
block-id lists (one id, unsorted non-contiguous ids, a consecutive run, every block permuted):

1. ``pack(..., impl=impl)`` on the device == the independent CPU reference packer (``kvhelpers.reference_pack``),
   byte for byte; on CUDA also == ``impl="torch"`` on the device, and ``pack`` into pinned host memory == the same;
2. ``unpack`` of that chunk into *other* block ids of another cache on the device: those blocks hold exactly the
   source blocks' bytes, every other block of every layer is unchanged; on CUDA also ``unpack`` from the pinned
   host buffer gives the same cache bytes.

It raises :class:`AssertionError` naming the case, the ids and the check that failed; it returns the number of
byte comparisons made. vLLM >= 0.32 cases (``LayoutCase.vllm_order`` set) build the per-layer caches as views of
ONE 5-D allocation in that memory order, so interleaved layers and head planes are covered too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from pdmesh.kernels import KVLayout, pack, unpack, vllm_paged_layout
from tests.kernels.kvhelpers import DTYPES, LAYOUT_CASES, NB, block_bytes, reference_pack, same_bytes

VLLM_ORDERS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")


@dataclass(frozen=True)
class LayoutCase:
    """One (layout, per-layer logical shape, dtype) to check. ``vllm_order``: a vLLM ``KVCacheLayout`` name when
    the layers are views of one ``[L, B, H, N, C]`` allocation in that memory order, else None (one dense tensor
    per layer in the layout's own memory order)."""

    layout: KVLayout
    shape: tuple[int, ...]
    dtype: torch.dtype
    vllm_order: str | None = None

    @property
    def id(self) -> str:
        """A short stable name, e.g. ``flash_attn_hnd-bfloat16``."""
        return f"{self.layout.name}-{str(self.dtype).removeprefix('torch.')}"


def all_cases(dtypes: list[torch.dtype] | None = None) -> list[LayoutCase]:
    """Every registered GPU/CPU layout the kernels support (``kvhelpers.LAYOUT_CASES`` plus the six vLLM >= 0.32
    memory orders) times every dtype in ``dtypes`` (default: ``kvhelpers.DTYPES``, fp32/bf16/fp16/fp8 x2)."""
    cases = []
    for dtype in dtypes if dtypes is not None else DTYPES:
        cases += [LayoutCase(layout, shape, dtype) for layout, shape in LAYOUT_CASES]
        cases += [LayoutCase(vllm_paged_layout(o), (NB, 2, 4, 8), dtype, o) for o in VLLM_ORDERS]
    return cases


def build_caches(
    case: LayoutCase, num_layers: int, seed: int, device: torch.device | str
) -> list[torch.Tensor]:
    """Per-layer caches of ``case`` on ``device`` filled with random bytes; the same ``seed`` gives the same bytes
    on every device (generated on the CPU, moved as one contiguous physical allocation, then viewed)."""
    gen = torch.Generator().manual_seed(seed)
    esize = torch.empty(0, dtype=case.dtype).element_size()

    def raw(phys_shape: list[int]) -> torch.Tensor:
        n = 1
        for s in phys_shape:
            n *= s
        data = torch.randint(0, 256, (n * esize,), dtype=torch.uint8, generator=gen).to(device)
        return data.view(case.dtype).view(phys_shape)

    if case.vllm_order is not None:
        logical = (num_layers, *case.shape)  # [L, B, H, N, C]
        order = ["LBHNC".index(ch) for ch in case.vllm_order]
        full = raw([logical[d] for d in order]).permute(*[order.index(d) for d in range(5)])
        return [full[i] for i in range(num_layers)]
    order = case.layout.stride_order or tuple(range(case.layout.ndim))
    inverse = [order.index(d) for d in range(case.layout.ndim)]
    return [raw([case.shape[d] for d in order]).permute(*inverse) for _ in range(num_layers)]


def id_lists(num_blocks: int, seed: int) -> list[list[int]]:
    """Block-id lists covering the kernels' code paths: one id, unsorted non-contiguous ids, a consecutive run,
    all blocks in a random order."""
    rng = random.Random(seed)
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    run = min(3, num_blocks)
    return [[num_blocks - 1], ids[:3], list(range(1, 1 + run)) if num_blocks > run else ids[:run], ids]


def _cpu(caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Host copies of the caches that never alias them: each tensor's whole storage copied byte for byte, viewed
    with the same offset, shape and strides (no dtype kernel runs on the device, so fp8 needs nothing there)."""
    copies = []
    for t in caches:
        host = torch.empty(t.untyped_storage().nbytes(), dtype=torch.uint8)
        host.untyped_storage().copy_(t.untyped_storage())
        view = torch.empty(0, dtype=t.dtype)
        view.set_(host.untyped_storage(), t.storage_offset(), t.shape, t.stride())
        copies.append(view)
    return copies


def check_case(
    case: LayoutCase, device: torch.device | str, impl: str = "triton", num_layers: int = 3, seed: int = 0
) -> int:
    """Run the checks in the module doc for ``case`` on ``device``; raises AssertionError, returns #comparisons."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    layout = case.layout
    src = build_caches(case, num_layers, seed, device)
    src_cpu = build_caches(case, num_layers, seed, "cpu")
    nb = int(src_cpu[0].shape[layout.dims.index(layout.block_dim)])
    checks = 0
    for k, ids in enumerate(id_lists(nb, seed)):
        where = f"{case.id} ({'vLLM ' + case.vllm_order if case.vllm_order else 'per-layer'}), ids {ids}"
        expect = reference_pack(src_cpu, layout, ids)
        buf = pack(src, layout, ids, impl=impl)  # type: ignore[arg-type]
        if cuda:
            torch.cuda.synchronize(device)
        assert same_bytes(buf.cpu(), expect), f"{where}: pack({impl}) differs from the reference packer"
        checks += 1
        if cuda:
            assert same_bytes(pack(src, layout, ids, impl="torch").cpu(), expect), f"{where}: pack(torch)"
            pinned = torch.empty(expect.numel(), dtype=torch.uint8).pin_memory()
            pack(src, layout, ids, out=pinned, impl=impl)  # type: ignore[arg-type]
            torch.cuda.synchronize(device)
            assert same_bytes(pinned, expect), f"{where}: pack({impl}) into pinned host memory"
            checks += 2

        dst_ids = random.Random(seed * 31 + k).sample(range(nb), len(ids))
        dst = build_caches(case, num_layers, seed + 1000 + k, device)
        before = _cpu(dst)
        unpack(buf, dst, layout, dst_ids, impl=impl)  # type: ignore[arg-type]
        after = _cpu(dst)  # .cpu() synchronizes
        checks += _check_unpacked(after, before, src_cpu, layout, ids, dst_ids, f"{where}: unpack({impl})")
        if cuda:
            dst2 = build_caches(case, num_layers, seed + 1000 + k, device)
            unpack(pinned, dst2, layout, dst_ids, impl=impl)  # type: ignore[arg-type]
            after2 = _cpu(dst2)
            for layer in range(num_layers):
                assert same_bytes(
                    reference_pack([after2[layer]], layout, list(range(nb))),
                    reference_pack([after[layer]], layout, list(range(nb))),
                ), f"{where}: unpack({impl}) from pinned host memory, layer {layer}"
            checks += num_layers
    return checks


def _check_unpacked(
    after: list[torch.Tensor],
    before: list[torch.Tensor],
    src: list[torch.Tensor],
    layout: KVLayout,
    src_ids: list[int],
    dst_ids: list[int],
    where: str,
) -> int:
    """Blocks ``dst_ids`` of ``after`` hold ``src``'s blocks ``src_ids``; every other block equals ``before``."""
    checks = 0
    nb = int(after[0].shape[layout.dims.index(layout.block_dim)])
    moved = dict(zip(dst_ids, src_ids, strict=True))
    for layer, (a, b, s) in enumerate(zip(after, before, src, strict=True)):
        for blk in range(nb):
            got = block_bytes(a, layout, blk)
            if blk in moved:
                ok = same_bytes(got, block_bytes(s, layout, moved[blk]))
                assert ok, f"{where}: layer {layer} block {blk} is not source block {moved[blk]}"
            else:
                assert same_bytes(got, block_bytes(b, layout, blk)), (
                    f"{where}: untouched layer {layer} block {blk}"
                )
            checks += 1
    return checks
