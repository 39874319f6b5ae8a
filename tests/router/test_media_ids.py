"""Client-chosen ids of multimodal inputs never reach an engine: vLLM would key cached KV by them."""

from __future__ import annotations

import json

from pdmesh.router.openai_requests import json_object


def test_media_uuids_are_removed_at_the_edge():
    body = {
        "model": "m",
        "multi_modal_uuids": {"image": ["victim-id"]},
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,AAAA"},
                        "uuid": "victim-id",
                    },
                    {"type": "text", "text": "what is this?"},
                ],
            },
            {"role": "assistant", "content": "plain text"},
        ],
    }
    out = json_object(json.dumps(body).encode())
    assert "multi_modal_uuids" not in out
    assert all("uuid" not in part for part in out["messages"][0]["content"])
    assert out["messages"][0]["content"][1] == {"type": "text", "text": "what is this?"}
    assert out["messages"][1]["content"] == "plain text"


def test_salt_and_media_reseed_the_routers_keys_and_media_skip_tier_lookups():
    from pdmesh.router.prompt_keys import has_media, input_scope, token_info

    def chat(url: str, salt: str | None = None) -> dict:
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]
        body = {"model": "m", "messages": [{"role": "user", "content": content}]}
        return body if salt is None else {**body, "cache_salt": salt}

    plain = {"model": "m", "messages": [{"role": "user", "content": "what?"}]}
    assert input_scope(plain) == "" and not has_media(plain)
    a, b = chat("data:a"), chat("data:b")
    assert has_media(a) and input_scope(a) == input_scope(chat("data:a")) != input_scope(b)
    assert input_scope(chat("data:a", "t1")) != input_scope(a)
    ids = list(range(64))
    keys = {name: token_info("m", ids, 16, body).keys for name, body in (("a", a), ("b", b), ("p", plain))}
    assert keys["a"][0] != keys["b"][0] != keys["p"][0]
    assert not token_info("m", ids, 16, a).tier_lookup_ok and token_info("m", ids, 16, plain).tier_lookup_ok
