"""The tier's slot per chunk, from the model's config: all heads for one engine process, a rank's share of the KV
heads for a tensor-parallel engine (each rank stores only its part, under its own shard key)."""

from __future__ import annotations

import json

import pytest

from pdmesh.worker.tier_process import chunk_nbytes_for_model


@pytest.mark.parametrize(
    "kv_heads, tp, heads_per_rank", [(8, 1, 8), (8, 2, 4), (8, 8, 1), (2, 4, 1), (2, 2, 1), (None, 2, 8)]
)
def test_a_slot_holds_one_ranks_part_of_a_chunk(tmp_path, kv_heads, tp, heads_per_rank):
    cfg = {"num_hidden_layers": 3, "num_attention_heads": 16, "hidden_size": 1024}  # head_dim 64
    if kv_heads is not None:
        cfg["num_key_value_heads"] = kv_heads
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    per_head = 3 * 2 * 64 * 128 * 2  # layers x (K, V) x head_dim x tokens x bf16
    assert chunk_nbytes_for_model(str(tmp_path), "bfloat16", 128, tp) == heads_per_rank * per_head
    assert chunk_nbytes_for_model(str(tmp_path / "missing"), "bfloat16", 128, tp) is None
