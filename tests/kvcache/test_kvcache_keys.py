from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdmesh.kvcache.keys import ModelFingerprint, chain_keys, chunk_keys, key_from_hex
from pdmesh.kvcache.pool import ChunkPool

FP = ModelFingerprint("tiny-llama", "r1", "float32", "cpu", 128, 0, 1)


def test_only_full_chunks_and_chained():
    toks = list(range(1000))
    keys = chunk_keys(FP, toks, 256)
    assert len(keys) == 3 and all(len(k) == 16 for k in keys)
    assert chunk_keys(FP, toks[:768], 256) == keys
    assert chunk_keys(FP, toks[:767], 256) == keys[:2]
    # a change in chunk 0 changes every later key (chained), a change in chunk 2 only the last
    changed = [*toks[:10], 99999, *toks[11:]]
    assert all(a != b for a, b in zip(chunk_keys(FP, changed, 256), keys, strict=True))
    late = [*toks[:600], 7, *toks[601:]]
    assert chunk_keys(FP, late, 256)[:2] == keys[:2] and chunk_keys(FP, late, 256)[2] != keys[2]


def test_fingerprint_fields_all_matter():
    base = FP.digest()
    variants = [
        ModelFingerprint("other", "r1", "float32", "cpu", 128, 0, 1),
        ModelFingerprint("tiny-llama", "r2", "float32", "cpu", 128, 0, 1),
        ModelFingerprint("tiny-llama", "r1", "bfloat16", "cpu", 128, 0, 1),
        ModelFingerprint("tiny-llama", "r1", "float32", "flash", 128, 0, 1),
        ModelFingerprint("tiny-llama", "r1", "float32", "cpu", 64, 0, 1),
        ModelFingerprint("tiny-llama", "r1", "float32", "cpu", 128, 1, 2),
        ModelFingerprint("tiny-llama", "r1", "float32", "cpu", 128, 0, 2),
        ModelFingerprint("tiny-llama", "r1", "float32", "cpu", 128, 0, 1, format_version=2),
    ]
    digests = {v.digest() for v in variants}
    assert len(digests) == len(variants) and base not in digests
    assert ModelFingerprint.from_dict(FP.to_dict()) == FP


def test_bad_inputs():
    with pytest.raises(ValueError):
        chunk_keys(FP, [1, -1], 2)
    with pytest.raises(ValueError):
        chunk_keys(FP, [1, 2**32], 2)
    with pytest.raises(ValueError):
        chunk_keys(FP, [1, 2], 0)
    with pytest.raises(ValueError):
        chain_keys(b"short", [1, 2], 2)
    with pytest.raises(ValueError):
        key_from_hex("abcd")
    assert key_from_hex(FP.digest().hex()) == FP.digest()


_CHILD = """
import json, sys
from pdmesh.kvcache.keys import ModelFingerprint, chunk_keys
fp = ModelFingerprint(**json.loads(sys.argv[1]))
print(json.dumps([k.hex() for k in chunk_keys(fp, list(range(5, 5 + 64 * 7)), 64)]))
"""


def test_two_processes_compute_identical_keys():
    """Different interpreters (different PYTHONHASHSEED) must agree: the LMCache 0%-hit-rate bug class."""
    outs = []
    for seed in ("1", "2"):
        r = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(FP.to_dict())],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            check=True,
        )
        outs.append(json.loads(r.stdout))
    mine = [k.hex() for k in chunk_keys(FP, list(range(5, 5 + 64 * 7)), 64)]
    assert outs[0] == outs[1] == mine and len(mine) == 7


def test_different_fingerprints_never_collide_in_a_tier():
    other = ModelFingerprint("tiny-llama", "r1", "float32", "cpu", 128, 1, 2)
    toks = list(range(64 * 4))
    ka, kb = chunk_keys(FP, toks, 64), chunk_keys(other, toks, 64)
    assert not set(ka) & set(kb)
    with ChunkPool(64, 16) as pool:
        for i, (a, b) in enumerate(zip(ka, kb, strict=True)):
            assert pool.put(a, bytes([i]) * 8)
            assert pool.put(b, bytes([100 + i]) * 8)
        assert pool.lookup(ka) == 4 and pool.lookup(kb) == 4
        assert [pool.get(k) for k in ka] == [bytes([i]) * 8 for i in range(4)]
        assert [pool.get(k) for k in kb] == [bytes([100 + i]) * 8 for i in range(4)]


def test_each_shard_of_a_chunk_has_its_own_key():
    from pdmesh.kvcache.keys import every_shard_keys, shard_key, shard_keys

    keys = chunk_keys(FP, list(range(1024)), 256)
    assert shard_keys(keys, 0, 1) == keys  # one shard: the chunk keys themselves
    assert every_shard_keys(keys, 1) == keys
    parts = [shard_keys(keys, s, 4) for s in range(4)]
    every = {k for p in parts for k in p}
    assert len(every) == 16 and not every & set(keys)  # distinct per shard and chunk, never a chunk key
    assert parts[2][1] == shard_key(keys[1], 2)  # deterministic, from the chunk key and the shard alone
    assert every_shard_keys(keys, 4) == [parts[s][c] for c in range(4) for s in range(4)]  # chunk by chunk
    with pytest.raises(ValueError):
        shard_keys(keys, 4, 4)
    with pytest.raises(ValueError):
        shard_key(keys[0], 1 << 16)


def test_pipeline_stages_count_as_shards_and_leave_unstaged_keys_unchanged():
    import hashlib
    from dataclasses import asdict

    fields = {k: v for k, v in asdict(FP).items() if k != "pp_size"}  # the fields before stages existed
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    assert FP.digest() == hashlib.blake2b(canon, digest_size=16, person=b"pdmesh-fp").digest()
    tp2 = ModelFingerprint("tiny-llama", "r1", "float32", "cpu", 128, 0, 2)
    staged = ModelFingerprint("tiny-llama", "r1", "float32", "cpu", 128, 0, 2, pp_size=2)
    assert (FP.shards, tp2.shards, staged.shards) == (1, 2, 4)
    assert staged.digest() != tp2.digest()
    assert ModelFingerprint.from_dict(staged.to_dict()) == staged
