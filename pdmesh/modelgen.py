"""Build the embedded default model: a tiny random Llama with a byte-level BPE tokenizer.

Nothing can be downloaded from a model hub in our test and demo environments, so pdmesh builds its own model
locally. The build is deterministic: the same pdmesh version produces byte-identical weights and tokenizer files
on every machine (seeded torch RNG, corpus generated from a seeded word list shipped in this module).

Greedy outputs of a random model are gibberish but deterministic; correctness tests compare a PD cluster's token
ids with a single engine's, never with "plausible English".
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the build changes in a way that changes the produced files (it is part of the cache path).
MODEL_FORMAT_VERSION = 1
DEFAULT_MODEL_NAME = "pdmesh-tiny-llama"

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "be",
    "are",
    "this",
    "an",
    "not",
    "or",
    "have",
    "which",
    "one",
    "had",
    "but",
    "all",
    "were",
    "they",
    "there",
    "can",
    "been",
    "has",
    "more",
    "if",
    "will",
    "would",
    "when",
    "who",
    "so",
    "what",
    "out",
    "up",
    "about",
    "into",
    "than",
    "them",
    "some",
    "could",
    "time",
    "only",
    "other",
    "new",
    "these",
    "two",
    "may",
    "first",
    "then",
    "do",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "prefill",
    "decode",
    "cache",
    "token",
    "kernel",
    "layer",
    "block",
    "chunk",
    "router",
    "worker",
    "request",
    "stream",
    "memory",
    "transfer",
    "latency",
    "bandwidth",
    "engine",
    "model",
    "tensor",
    "batch",
    "queue",
    "lease",
    "commit",
    "write",
    "read",
    "shared",
    "remote",
    "local",
    "disk",
    "pool",
    "page",
    "prefix",
    "hash",
    "key",
    "value",
    "attention",
    "head",
    "vector",
    "matrix",
    "gradient",
    "weight",
    "bias",
    "norm",
    "rope",
    "sequence",
    "context",
    "window",
    "output",
    "input",
    "server",
    "client",
    "socket",
    "packet",
    "network",
    "cluster",
    "node",
    "replica",
    "shard",
]


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the generated Llama. Defaults are the embedded default model (about 4.5M parameters)."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    vocab_size: int = 4096
    max_position_embeddings: int = 8192
    initializer_range: float = 0.1
    seed: int = 0


def default_model_dir() -> Path:
    """Where the embedded default model is cached: ``$PDMESH_HOME/models/...`` (default ``~/.cache/pdmesh``)."""
    home = Path(os.environ.get("PDMESH_HOME", Path.home() / ".cache" / "pdmesh"))
    return home / "models" / f"{DEFAULT_MODEL_NAME}-v{MODEL_FORMAT_VERSION}"


def _corpus(seed: int, sentences: int = 6000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        n = rng.randint(4, 18)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        s = " ".join(words)
        out.append(s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!", ","]))
    return out


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _build_tokenizer(out: Path, spec: TinyModelSpec) -> int:
    """Train a byte-level BPE on the generated corpus and save it as a HF fast tokenizer. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec.max_position_embeddings
    fast.save_pretrained(out)
    return len(fast)


def make_model(
    out_dir: str | os.PathLike[str], spec: TinyModelSpec | None = None, force: bool = False
) -> Path:
    """Build the tiny model into ``out_dir`` (atomically: built in a temp dir, then renamed).

    Returns the directory. If it already holds a complete model built by this format version and ``force`` is
    false, it is returned untouched. Blocking; about 5-10 s on one core.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    marker = out / "pdmesh-model.json"
    if marker.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pdmesh-model-", dir=out.parent))
    try:
        vocab = _build_tokenizer(tmp, spec)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            head_dim=spec.head_dim,
            max_position_embeddings=spec.max_position_embeddings,
            initializer_range=spec.initializer_range,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            tie_word_embeddings=False,
            torch_dtype="float32",
        )
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config).to(torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        gen = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        meta = {"name": DEFAULT_MODEL_NAME, "format_version": MODEL_FORMAT_VERSION, "spec": asdict(spec)}
        (tmp / "pdmesh-model.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_default_model() -> Path:
    """Return the embedded default model directory, building it on first use."""
    return make_model(default_model_dir())
