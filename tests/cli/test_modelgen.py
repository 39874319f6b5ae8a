"""The built-in model: deterministic build, loadable by transformers with its chat template."""

from __future__ import annotations

import hashlib

from pdmesh.modelgen import TinyModelSpec, make_model

SMALL = TinyModelSpec(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    vocab_size=600,
    max_position_embeddings=256,
)


def _digest(d) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_build_is_deterministic_and_loads(tmp_path):
    a = make_model(tmp_path / "a", SMALL)
    b = make_model(tmp_path / "b", SMALL)
    assert _digest(a) == _digest(b)
    assert {"model.safetensors", "tokenizer.json", "config.json", "pdmesh-model.json"} <= set(_digest(a))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a)
    ids = tok("prefill and decode", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "prefill and decode"  # byte-level BPE round-trips text
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size >= len(tok)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|assistant|>\n") and "hi" in chat


def test_existing_model_is_reused_unless_forced(tmp_path):
    d = make_model(tmp_path / "m", SMALL)
    marker = d / "pdmesh-model.json"
    before = marker.stat().st_mtime_ns
    make_model(d, SMALL)
    assert marker.stat().st_mtime_ns == before
    make_model(d, SMALL, force=True)
    assert marker.exists()
