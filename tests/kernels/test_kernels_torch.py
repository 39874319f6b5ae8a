"""pack/unpack (torch path): bit-exact round trips for every layout and dtype, untouched blocks, errors."""

from __future__ import annotations

import random
from multiprocessing import shared_memory

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdmesh.kernels import (
    CPU_ATTN,
    FLASH_ATTN_NHD,
    BlockIdError,
    ChunkBufferError,
    ChunkFormat,
    LayoutError,
    bind,
    chunk_format,
    chunk_nbytes,
    pack,
    unpack,
    vllm_paged_layout,
)
from pdmesh.kernels.layouts import cache_geometry
from tests.kernels.kvhelpers import (
    DTYPES,
    LAYOUT_CASES,
    NB,
    block_bytes,
    random_caches,
    reference_pack,
    same_bytes,
)

LAYERS = 3


def _ids(rng: random.Random, n: int) -> list[int]:
    return rng.sample(range(NB), n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("layout", "shape"), LAYOUT_CASES, ids=[c[0].name for c in LAYOUT_CASES])
@pytest.mark.parametrize("n", [1, 2, 5, NB])
def test_round_trip_bit_exact_and_untouched(layout, shape, dtype, n):
    rng = random.Random(n * 7919 + len(layout.name))
    src = random_caches(layout, shape, dtype, LAYERS, seed=1)
    src_ids = _ids(rng, n)
    buf = pack(src, layout, src_ids, impl="torch")
    assert buf.numel() == chunk_nbytes(layout, src, n)
    assert same_bytes(buf, reference_pack(src, layout, src_ids)), "buffer differs from the documented format"

    # Unpack into other block ids of another cache: same bytes there, every other block unchanged.
    dst = random_caches(layout, shape, dtype, LAYERS, seed=2)
    before = [t.clone() for t in dst]
    dst_ids = _ids(rng, n)
    unpack(buf, dst, layout, dst_ids, impl="torch")
    for layer in range(LAYERS):
        for s_id, d_id in zip(src_ids, dst_ids, strict=True):
            assert same_bytes(block_bytes(dst[layer], layout, d_id), block_bytes(src[layer], layout, s_id))
        for b in set(range(NB)) - set(dst_ids):
            assert same_bytes(block_bytes(dst[layer], layout, b), block_bytes(before[layer], layout, b))
    # And packing those blocks back gives the identical buffer.
    assert same_bytes(pack(dst, layout, dst_ids, impl="torch"), buf)


def test_format_offsets_match_formula():
    layout, shape = LAYOUT_CASES[0]  # FlashAttention: 2 planes per block
    caches = random_caches(layout, shape, torch.bfloat16, LAYERS, seed=3)
    ids = [4, 0, 7]
    fmt = chunk_format(layout, caches, len(ids))
    buf = pack(caches, layout, ids)
    for layer in range(LAYERS):
        for plane in range(2):
            for i, b in enumerate(ids):
                off = fmt.offset(layer, plane, i)
                expect = caches[layer][plane, b].contiguous().view(torch.uint8).reshape(-1)
                assert same_bytes(buf[off : off + fmt.plane_nbytes], expect)
    assert fmt.nbytes == LAYERS * 2 * len(ids) * 4 * 2 * 8 * 2


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, NB - 1), min_size=1, max_size=NB, unique=True),
    st.integers(0, len(LAYOUT_CASES) - 1),
)
def test_round_trip_property(ids, case):
    layout, shape = LAYOUT_CASES[case]
    src = random_caches(layout, shape, torch.float16, 2, seed=len(ids))
    buf = pack(src, layout, ids)
    assert same_bytes(buf, reference_pack(src, layout, ids))
    dst = [torch.zeros_like(t) for t in src]
    unpack(buf, dst, layout, ids)
    for s, d in zip(src, dst, strict=True):
        for b in ids:
            assert same_bytes(block_bytes(d, layout, b), block_bytes(s, layout, b))


def test_dict_input_and_preallocated_out_larger_than_needed():
    caches = random_caches(CPU_ATTN, (NB, 2, 32, 16), torch.float32, LAYERS, seed=4)
    named = {f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(caches)}
    nbytes = chunk_nbytes(CPU_ATTN, named, 3)
    out = torch.full((nbytes + 100,), 0xAB, dtype=torch.uint8)
    view = pack(named, CPU_ATTN, [8, 1, 2], out=out)
    assert view.data_ptr() == out.data_ptr() and view.numel() == nbytes
    assert torch.all(out[nbytes:] == 0xAB), "wrote past chunk_nbytes"
    assert same_bytes(view, reference_pack(caches, CPU_ATTN, [8, 1, 2]))


def test_pack_into_and_unpack_from_shared_memory():
    caches = random_caches(FLASH_ATTN_NHD, (2, NB, 4, 2, 8), torch.bfloat16, LAYERS, seed=5)
    ids = [3, 8, 0, 1]
    nbytes = chunk_nbytes(FLASH_ATTN_NHD, caches, len(ids))
    shm = shared_memory.SharedMemory(create=True, size=nbytes + 4096)
    try:
        pool = torch.frombuffer(shm.buf, dtype=torch.uint8)
        region = pool[4096 : 4096 + nbytes]  # a region inside the pool, not at its start
        pack(caches, FLASH_ATTN_NHD, ids, out=region)
        assert same_bytes(region, reference_pack(caches, FLASH_ATTN_NHD, ids))
        dst = [torch.zeros_like(t) for t in caches]
        unpack(region, dst, FLASH_ATTN_NHD, [5, 6, 7, 2])
        for s, d in zip(caches, dst, strict=True):
            assert torch.equal(d[:, [5, 6, 7, 2]].view(torch.int16), s[:, ids].view(torch.int16))
        del pool, region
    finally:
        shm.close()
        shm.unlink()


def test_inference_mode_tensors():
    with torch.inference_mode():
        caches = random_caches(CPU_ATTN, (NB, 2, 32, 16), torch.bfloat16, 2, seed=6)
        buf = pack(caches, CPU_ATTN, [2, 5])
        dst = [torch.zeros_like(t) for t in caches]
        unpack(buf, dst, CPU_ATTN, [0, 1])
    assert same_bytes(dst[1][0:2], caches[1][[2, 5]])


def test_contiguous_run_and_single_block_paths():
    caches = random_caches(CPU_ATTN, (NB, 2, 32, 16), torch.float32, 2, seed=7)
    for ids in ([4], [2, 3, 4, 5], list(range(NB))):
        buf = pack(caches, CPU_ATTN, ids)
        assert same_bytes(buf, reference_pack(caches, CPU_ATTN, ids))
        dst = [torch.zeros_like(t) for t in caches]
        unpack(buf, dst, CPU_ATTN, ids)
        assert all(same_bytes(d[ids], s[ids]) for d, s in zip(dst, caches, strict=True))


def test_empty_block_list():
    caches = random_caches(CPU_ATTN, (NB, 2, 32, 16), torch.float32, 2, seed=8)
    assert pack(caches, CPU_ATTN, []).numel() == 0
    unpack(torch.empty(0, dtype=torch.uint8), caches, CPU_ATTN, [])


@pytest.mark.parametrize("name", ["LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"])
def test_vllm_standardized_views(name):
    """vLLM >= 0.32 per-layer [B, H, N, C] views of one 5-D [L, B, H, N, C] allocation in every memory order."""
    num_layers, nb, h, n, c = 3, NB, 2, 4, 8
    logical = (num_layers, nb, h, n, c)
    order = ["LBHNC".index(ch) for ch in name]
    raw = torch.randint(-(2**15), 2**15, [logical[d] for d in order], dtype=torch.int16).view(torch.bfloat16)
    full = raw.permute(*[order.index(d) for d in range(5)])  # logical [L, B, H, N, C] view
    caches = [full[i] for i in range(num_layers)]
    layout = vllm_paged_layout(name)
    ids = [6, 1, 2]
    buf = pack(caches, layout, ids)
    dst_full = torch.zeros_like(raw).permute(*[order.index(d) for d in range(5)])
    dst = [dst_full[i] for i in range(num_layers)]
    unpack(buf, dst, layout, [0, 4, 8])
    for i in range(num_layers):
        assert torch.equal(dst[i][[0, 4, 8]].view(torch.int16), caches[i][ids].view(torch.int16))
        assert torch.all(dst[i][[1, 2, 3, 5, 6, 7]].view(torch.int16) == 0)


def test_errors_are_typed_and_write_nothing():
    caches = random_caches(CPU_ATTN, (NB, 2, 32, 16), torch.float32, 2, seed=9)
    before = [t.clone() for t in caches]
    buf = pack(caches, CPU_ATTN, [1, 2])
    with pytest.raises(BlockIdError):
        pack(caches, CPU_ATTN, [1, NB])
    with pytest.raises(BlockIdError):
        pack(caches, CPU_ATTN, [-1])
    with pytest.raises(BlockIdError):
        unpack(buf, caches, CPU_ATTN, [3, 3])
    with pytest.raises(ChunkBufferError):
        unpack(buf[:-1], caches, CPU_ATTN, [3, 4])
    with pytest.raises(ChunkBufferError):
        pack(caches, CPU_ATTN, [1, 2], out=torch.empty(buf.numel() - 1, dtype=torch.uint8))
    with pytest.raises(ChunkBufferError):
        pack(caches, CPU_ATTN, [1, 2], out=torch.empty(buf.numel(), dtype=torch.int8))
    with pytest.raises(LayoutError):
        pack(caches, FLASH_ATTN_NHD, [1])
    with pytest.raises(LayoutError):
        pack([caches[0], caches[1][:, :1]], CPU_ATTN, [1])
    for b, a in zip(before, caches, strict=True):
        assert same_bytes(a, b)


def test_chunk_nbytes_from_shape_matches_tensors():
    for layout, shape in LAYOUT_CASES:
        caches = random_caches(layout, shape, torch.bfloat16, 2, seed=10)
        assert chunk_nbytes(layout, shape, 4, num_layers=2, dtype=torch.bfloat16) == chunk_nbytes(
            layout, caches, 4
        )
        geo = cache_geometry(layout, caches)
        assert ChunkFormat.of(geo, 2, 4).nbytes == 2 * 4 * geo.block_nbytes


def test_bind_once_then_pack_unpack_many():
    caches = random_caches(FLASH_ATTN_NHD, (2, NB, 4, 2, 8), torch.bfloat16, LAYERS, seed=16)
    bound = bind({str(i): t for i, t in enumerate(caches)}, FLASH_ATTN_NHD)
    pool = torch.zeros(bound.chunk_nbytes(3) * 3, dtype=torch.uint8)
    for k, ids in enumerate(([1, 5, 2], [0, 1, 2], [8, 7, 6])):
        region = pool[k * bound.chunk_nbytes(3) : (k + 1) * bound.chunk_nbytes(3)]
        bound.pack(ids, out=region)
        assert same_bytes(region, reference_pack(caches, FLASH_ATTN_NHD, ids))
    saved = [t.clone() for t in caches]
    bound.unpack(pool[: bound.chunk_nbytes(3)], [3, 4, 0])
    for s, t in zip(saved, caches, strict=True):
        assert same_bytes(t[:, [3, 4, 0]], s[:, [1, 5, 2]])
