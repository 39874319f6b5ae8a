"""What a worker advertises it serves: the engine's base model and LoRA adapters, re-read from its /v1/models
(adapters loaded at run time appear at the next read; a failed read keeps the last answer)."""

from __future__ import annotations

import asyncio

import httpx

from pdmesh.router.registration import WorkerRegistration
from pdmesh.worker.served_models import ServedModels, models_from_cards

REG = WorkerRegistration(worker_id="w", role="decode", url="http://127.0.0.1:1", models=["base"])


def _card(id_, parent=None):
    return {"id": id_, "object": "model", "root": f"/m/{id_}", "parent": parent}


def test_adapters_are_the_cards_with_another_parent():
    cards = [_card("sql", "base"), _card("base"), "junk", {"id": 5}, _card("chat", "base")]
    assert models_from_cards(cards) == (["base", "sql", "chat"], ["sql", "chat"])
    assert models_from_cards([_card("base", "base")]) == (["base"], [])


def test_refresh_follows_the_engine_and_keeps_the_last_answer_when_it_does_not_answer():
    served = {"cards": [_card("base")], "fail": False}
    seen_auth = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_auth.append(request.headers.get("authorization"))
        if served["fail"]:
            return httpx.Response(503)
        return httpx.Response(200, json={"object": "list", "data": served["cards"]})

    now = [0.0]
    watch = ServedModels(
        lambda: "http://engine", {"Authorization": "Bearer k"}, interval_s=2.0, clock=lambda: now[0]
    )

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            reg = await watch.refresh(REG, client)
            assert reg.models == ["base"] and reg.adapters == []
            served["cards"] = [_card("base"), _card("sql", "base")]  # /v1/load_lora_adapter on the engine
            assert (await watch.refresh(reg, client)).adapters == []  # not re-read within the interval
            now[0] = 2.0
            reg = await watch.refresh(reg, client)
            assert reg.models == ["base", "sql"] and reg.adapters == ["sql"]
            served["fail"] = True
            now[0] = 4.0
            reg = await watch.refresh(reg, client)
            assert reg.models == ["base", "sql"]  # the last known answer

    asyncio.run(scenario())
    assert set(seen_auth) == {"Bearer k"}
