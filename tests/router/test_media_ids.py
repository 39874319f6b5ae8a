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
