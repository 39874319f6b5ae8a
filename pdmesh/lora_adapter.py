"""A LoRA adapter for a locally built model, written in PEFT's on-disk format without PEFT itself.

``adapter_config.json`` (``peft_type: LORA``, rank, alpha, target modules) and ``adapter_model.safetensors`` with
``base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`` ([r, in] and [out, r]), shapes
read from the model's ``config.json``. Seeded: the same seed gives the same bytes. vLLM serves it with
``--enable-lora --max-lora-rank R --lora-modules name=DIR``. Used by the tests (two tenants' adapters on the tiny
model) and by anyone trying adapters through PD without a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_lora_adapter(
    model_dir: str | Path, out_dir: str | Path, seed: int, rank: int = 8, std: float = 0.05
) -> Path:
    """Write a random adapter (A and B both nonzero, so its answers differ from the base model's) for the Llama-
    shaped model at ``model_dir`` into ``out_dir``; returns ``out_dir``. Overwrites what is there."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    io = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(int(cfg["num_hidden_layers"])):
        for proj, (n_in, n_out) in io.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * std
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(PROJECTIONS),
        "base_model_name_or_path": str(model_dir),
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
