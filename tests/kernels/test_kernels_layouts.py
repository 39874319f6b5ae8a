"""Layout specs: geometry from tensors, detection from (backend, shape), declared memory order is enforced."""

from __future__ import annotations

import pytest
import torch

from pdmesh.kernels import (
    CPU_ATTN,
    FLASH_ATTN_HND,
    FLASH_ATTN_NHD,
    FLASHINFER_HND,
    FLASHINFER_NHD,
    MLA,
    KVLayout,
    LayerGeometry,
    LayoutError,
    get_layout,
    layout_for,
    register_layout,
    vllm_paged_layout,
)


def test_flash_attn_geometry_nhd_and_hnd():
    nb, bs, h, d = 10, 16, 8, 128
    for layout in (FLASH_ATTN_NHD, FLASH_ATTN_HND):
        t = layout.empty((2, nb, bs, h, d), torch.bfloat16, device="meta")
        geo = layout.geometry(t)
        plane = bs * h * d * 2
        assert geo == LayerGeometry(
            num_blocks=nb, num_planes=2, block_stride=plane, plane_stride=nb * plane, plane_nbytes=plane
        )


def test_flashinfer_cpu_mla_are_one_range_per_block():
    fi = FLASHINFER_NHD.geometry(torch.empty(10, 2, 16, 8, 64, dtype=torch.float16, device="meta"))
    assert (fi.num_planes, fi.plane_nbytes, fi.block_stride) == (1, 2 * 16 * 8 * 64 * 2, 2 * 16 * 8 * 64 * 2)
    cpu = CPU_ATTN.geometry(torch.empty(7, 2, 128, 128, dtype=torch.float32, device="meta"))
    assert (cpu.num_blocks, cpu.num_planes, cpu.plane_nbytes) == (7, 1, 2 * 128 * 128 * 4)
    mla = MLA.geometry(torch.empty(5, 64, 576, dtype=torch.float8_e4m3fn, device="meta"))
    assert (mla.num_blocks, mla.num_planes, mla.plane_nbytes) == (5, 1, 64 * 576)


def test_wrong_memory_order_is_refused():
    nhd = FLASH_ATTN_NHD.empty((2, 4, 16, 2, 8), torch.float32)
    hnd = FLASH_ATTN_HND.empty((2, 4, 16, 2, 8), torch.float32)
    with pytest.raises(LayoutError):
        FLASH_ATTN_HND.geometry(nhd)
    with pytest.raises(LayoutError):
        FLASH_ATTN_NHD.geometry(hnd)
    with pytest.raises(LayoutError):
        FLASHINFER_HND.geometry(torch.empty(4, 2, 16, 2, 8))
    with pytest.raises(LayoutError):
        CPU_ATTN.geometry(torch.empty(2, 4, 16, 2, 8))  # wrong rank


def test_layout_for_detection():
    assert layout_for("CPU_ATTN", (100, 2, 128, 128)) is CPU_ATTN
    assert layout_for("FLASH_ATTN", (2, 100, 16, 8, 128)) is FLASH_ATTN_NHD
    assert layout_for("FLASH_ATTN", (2, 100, 16, 8, 128), "HND") is FLASH_ATTN_HND
    assert layout_for("FLASHINFER", (100, 2, 16, 8, 128)) is FLASHINFER_NHD
    assert layout_for("FLASHINFER", (100, 2, 16, 8, 128), "HND") is FLASHINFER_HND
    assert layout_for("FLASHMLA", (100, 64, 576)) is MLA
    assert layout_for("FLASH_ATTN", (100, 8, 16, 256), "LBNHC").name == "vllm_LBNHC"
    with pytest.raises(LayoutError):
        layout_for("FLASH_ATTN", (100, 8, 16, 256))  # 4-D without vLLM's layout name: ambiguous
    with pytest.raises(LayoutError):
        layout_for("SOMETHING", (3, 3))


def test_vllm_layouts_plane_rule():
    assert vllm_paged_layout("LBHNC").plane_dim is None
    assert vllm_paged_layout("BLNHC").plane_dim is None
    assert vllm_paged_layout("LHBNC").plane_dim == "head"
    assert vllm_paged_layout("BHLNC").plane_dim == "head"
    with pytest.raises(LayoutError):
        vllm_paged_layout("NHD")


def test_new_layout_is_one_declaration():
    custom = register_layout(
        KVLayout("test_kv_token_major", ("block", "token", "kv", "head", "dim"), backends=("TEST_BACKEND",))
    )
    assert get_layout("test_kv_token_major") is custom
    geo = custom.geometry(torch.empty(6, 16, 2, 4, 32, dtype=torch.bfloat16))
    assert geo.plane_nbytes == 16 * 2 * 4 * 32 * 2
    with pytest.raises(LayoutError):
        register_layout(KVLayout("test_kv_token_major", ("block", "dim")))
    with pytest.raises(LayoutError):
        KVLayout("bad", ("block", "x"), plane_dim="y")
