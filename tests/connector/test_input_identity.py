"""Chunk identity beyond tokens: LoRA adapters, cache_salt, multimodal inputs and prompt embeddings never share KV
with other inputs (keys differ, or the request is not keyed at all)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="the connector imports vLLM's connector base classes")

from pdmesh.connector.identity import adapter_digest, identity_of
from pdmesh.kvcache.keys import InputIdentity, MediaInput, ModelFingerprint, chunk_keys
from tests.connector.test_connector_scheduler import FP, C, make, new_req_output

TOKENS = list(range(1, 41))  # 5 chunks of 8


@dataclass
class Req:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict | None = None
    cache_salt: str | None = None
    lora_request: object | None = None
    mm_features: list = field(default_factory=list)
    prompt_embeds: object | None = None
    output: list[int] = field(default_factory=list)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output


def _adapter(tmp_path, name: str, weights: bytes):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(weights)
    return d


def _lora(name, path):
    return SimpleNamespace(lora_name=name, lora_path=str(path), lora_int_id=1)


def _mm(offset, length, ident):
    return SimpleNamespace(identifier=ident, mm_position=SimpleNamespace(offset=offset, length=length))


# -- keys ----------------------------------------------------------------------------------------------------------
def test_plain_identity_keys_exactly_as_tokens_alone():
    assert chunk_keys(FP, TOKENS, C, InputIdentity()) == chunk_keys(FP, TOKENS, C)
    assert InputIdentity().plain and not InputIdentity(salt="t").plain


def test_salt_and_adapter_change_every_key_and_differ_from_each_other():
    plain = chunk_keys(FP, TOKENS, C)
    salted = chunk_keys(FP, TOKENS, C, InputIdentity(salt="tenant-a"))
    other_salt = chunk_keys(FP, TOKENS, C, InputIdentity(salt="tenant-b"))
    adapter = chunk_keys(FP, TOKENS, C, InputIdentity(adapter="tenant-a"))
    for a, b in [(plain, salted), (salted, other_salt), (salted, adapter), (plain, adapter)]:
        assert all(x != y for x, y in zip(a, b, strict=True))
    # deterministic: another identity object with equal fields gives equal keys
    assert chunk_keys(FP, TOKENS, C, InputIdentity(salt="tenant-a")) == salted


def test_media_changes_keys_from_the_first_overlapping_chunk_on():
    img_a = InputIdentity(media=(MediaInput(17, 10, "hash-a"),))  # chunks 2 and 3 (tokens 16..31)
    img_b = InputIdentity(media=(MediaInput(17, 10, "hash-b"),))
    moved = InputIdentity(media=(MediaInput(18, 10, "hash-a"),))
    plain, a, b, m = (chunk_keys(FP, TOKENS, C, i) for i in (None, img_a, img_b, moved))
    assert a[:2] == plain[:2] == b[:2]  # before the image: shared
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))  # other image: other KV from chunk 2 on
    assert all(x != y for x, y in zip(a[2:], plain[2:], strict=True))
    assert a[2] != m[2]  # the same image at another offset is other KV


# -- identity of a vLLM request ----------------------------------------------------------------------------------
def test_adapter_identity_follows_the_weights_not_the_path(tmp_path):
    one = _adapter(tmp_path, "one", b"weights-1" * 100)
    copy = _adapter(tmp_path, "copy", b"weights-1" * 100)
    other = _adapter(tmp_path, "other", b"weights-2" * 100)
    ident = [identity_of(Req("r", TOKENS, lora_request=_lora("sql", p))) for p in (one, copy, other)]
    assert all(isinstance(i, InputIdentity) for i in ident)
    assert ident[0].adapter == ident[1].adapter  # same weights mounted elsewhere: shared
    assert ident[0].adapter != ident[2].adapter  # the name re-pointed at other weights: not shared
    assert adapter_digest(str(one)) == adapter_digest(str(copy)) != ""
    assert adapter_digest(str(tmp_path / "missing")) == ""
    # an adapter whose weights cannot be read here is not keyed at all (its name alone says nothing of its KV)
    gone = identity_of(Req("r", TOKENS, lora_request=_lora("sql", tmp_path / "missing")))
    assert gone == "adapter_unreadable"


def test_requests_that_cannot_be_keyed_are_skips():
    assert identity_of(Req("r", TOKENS, prompt_embeds=object())) == "prompt_embeds"
    assert identity_of(Req("r", TOKENS, mm_features=[_mm(3, 4, None)])) == "multimodal_unhashed"
    ok = identity_of(Req("r", TOKENS, mm_features=[_mm(20, 4, "h2"), _mm(3, 4, "h1")], cache_salt="s"))
    assert isinstance(ok, InputIdentity)
    assert [m.identifier for m in ok.media] == ["h1", "h2"] and ok.salt == "s"
    assert identity_of(SimpleNamespace(mm_features=5)) == "unreadable"


# -- the scheduler -----------------------------------------------------------------------------------------------
def _save_keys(s, req):
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    blocks = list(range(10))
    s.update_state_after_alloc(req, blocks, 0)
    (save,) = s.build_meta(new_req_output(req, blocks, 0, len(req.prompt_token_ids))).saves
    return save.keys


def test_a_tenant_never_loads_another_tenants_chunks():
    s, tier, _ = make()
    tier.ready = set(_save_keys(s, Req("a1", TOKENS, cache_salt="tenant-a")))
    s.request_finished(Req("a1", TOKENS))
    # the same prompt from another tenant, from no tenant and through an adapter: misses
    assert s.get_num_new_matched_tokens(Req("b", TOKENS, cache_salt="tenant-b"), 0) == (0, False)
    assert s.get_num_new_matched_tokens(Req("plain", TOKENS), 0) == (0, False)
    # the same tenant again: hits everything but the last chunk
    assert s.get_num_new_matched_tokens(Req("a2", TOKENS, cache_salt="tenant-a"), 0) == (32, False)


def test_a_skipped_request_loads_saves_and_waits_for_nothing():
    s, tier, _ = make()
    tier.ready = set(chunk_keys(FP, TOKENS, C))
    decode_leg = Req("d", TOKENS, kv_transfer_params={"pdmesh": {"transfer_id": "t1", "deadline_ms": 5000}})
    decode_leg.prompt_embeds = object()
    # a decode leg that cannot be keyed does not wait for a push (the prefill leg pushes nothing for it either)
    assert s.get_num_new_matched_tokens(decode_leg, 0) == (0, False)
    blocks = list(range(10))
    s.update_state_after_alloc(decode_leg, blocks, 0)
    meta = s.build_meta(new_req_output(decode_leg, blocks, 0, len(TOKENS)))
    assert meta.loads == [] and meta.saves == []
    assert s.stats.skipped == {"prompt_embeds": 1}
    assert s.request_finished(decode_leg) is None


def test_fingerprints_with_other_layouts_never_share_keys():
    nhd = ModelFingerprint(model="m", block_size=16, layout="cuda:auto:FLASH_ATTN_NHD:kvh2:hd64")
    hnd = ModelFingerprint(model="m", block_size=16, layout="cuda:auto:FLASH_ATTN_HND:kvh2:hd64")
    assert chunk_keys(nhd, TOKENS, 16) != chunk_keys(hnd, TOKENS, 16)
