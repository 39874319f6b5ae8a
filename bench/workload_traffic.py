"""Traffic of the workload benchmark: multi-round chat, long-document QA, no reuse; and the client that drives it.

Why our own driver: each chat round's prompt is the previous history plus the *answer the server gave* plus a new
question, so the next request exists only after the previous answer; guidellm 0.8 (installed, used by the e2e
suite) replays independent synthetic requests, and aiperf's multi-turn datasets replay fixed turns. The client
is the ``openai`` SDK (``AsyncOpenAI``, streamed chat completions), as a user's application would be.

Arrivals: Poisson at ``a.rate`` (req/s). Chat: each arrival takes the next round of an idle user (fewest rounds done
first); when every unfinished user is waiting for an answer the arrival waits for the first one to be free.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import openai

# the vocabulary of the generated text (what ran for bench/results/workload.json)
WORDS = (  # noqa: SIM905 (one line of words reads better than a 48-line list)
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
    "romeo sierra tango uniform victor whiskey xray yankee zulu cache block token layer prefill decode router "
    "worker stream memory page tensor lease river mountain forest desert ocean valley island harbor bridge"
).split()


class Texts:
    """Random text of a given token length, measured with the model's own tokenizer."""

    def __init__(self, tokenizer, seed: int) -> None:
        self.tok = tokenizer
        self.rng = random.Random(seed)
        sample = " ".join(self.rng.choice(WORDS) for _ in range(2000))
        self.tokens_per_word = len(self.tok.encode(sample, add_special_tokens=False)) / 2000

    def make(self, tokens: int) -> str:
        n = max(1, round(tokens / self.tokens_per_word))
        return " ".join(self.rng.choice(WORDS) for _ in range(n))


@dataclass
class Result:
    workload: str
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


async def one_chat(
    client: openai.AsyncOpenAI, model: str, messages: list[dict], max_tokens: int, workload: str
):
    """One streamed chat completion; returns (Result, answer text)."""
    t0 = time.perf_counter()
    res = Result(workload, ok=False)
    text: list[str] = []
    last = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.usage is not None:
                res.output_tokens = chunk.usage.completion_tokens
                res.prompt_tokens = chunk.usage.prompt_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
                    text.append(choice.delta.content)
        res.e2e = time.perf_counter() - t0
        res.ok = last is not None
    except Exception as e:  # the benchmark records failures; it does not stop on them
        res.error = f"{type(e).__name__}: {e}"[:300]
    return res, "".join(text)


def poisson_gaps(rng: random.Random, qps: float, n: int) -> list[float]:
    return [rng.expovariate(qps) for _ in range(n)]


async def run_chat(client, model: str, texts: Texts, a) -> list[Result]:
    """``a.users`` users x ``a.rounds`` rounds; shared system prompt, per-user history, Poisson arrivals."""
    rng = random.Random(a.seed)
    system = texts.make(a.system_tokens)
    histories = [
        [{"role": "system", "content": system}, {"role": "user", "content": texts.make(a.history_tokens)}]
        for _ in range(a.users)
    ]
    for h in histories:  # the history is a past exchange: a user turn answered once already
        h.append({"role": "assistant", "content": texts.make(a.answer_tokens)})
    done = [0] * a.users
    busy = [False] * a.users
    free = asyncio.Condition()
    results: list[Result] = []

    async def round_of(u: int) -> None:
        messages = [*histories[u], {"role": "user", "content": texts.make(a.question_tokens)}]
        res, answer = await one_chat(client, model, messages, a.answer_tokens, "chat")
        results.append(res)
        histories[u] = [*messages, {"role": "assistant", "content": answer or "ok"}]
        async with free:
            done[u] += 1
            busy[u] = False
            free.notify_all()

    tasks = []
    for gap in poisson_gaps(rng, a.rate, a.users * a.rounds):
        await asyncio.sleep(gap)
        async with free:
            await free.wait_for(lambda: any(not busy[u] and done[u] < a.rounds for u in range(a.users)))
            u = min((u for u in range(a.users) if not busy[u] and done[u] < a.rounds), key=lambda u: done[u])
            busy[u] = True
        tasks.append(asyncio.create_task(round_of(u)))
    await asyncio.gather(*tasks)
    return results


async def run_doc_qa(client, model: str, texts: Texts, a) -> list[Result]:
    """``a.docs`` documents asked ``a.questions`` questions each, interleaved, Poisson arrivals."""
    rng = random.Random(a.seed + 1)
    docs = [texts.make(rng.randint(a.doc_tokens_min, a.doc_tokens_max)) for _ in range(a.docs)]
    order = [(d, q) for q in range(a.questions) for d in range(a.docs)]
    tasks = []
    for gap, (d, _q) in zip(poisson_gaps(rng, a.rate, len(order)), order, strict=True):
        await asyncio.sleep(gap)
        messages = [
            {"role": "system", "content": "Answer from the document."},
            {"role": "user", "content": docs[d] + "\n\nQuestion: " + texts.make(a.question_tokens)},
        ]
        tasks.append(asyncio.create_task(one_chat(client, model, messages, a.answer_tokens, "doc_qa")))
    return [r for r, _ in await asyncio.gather(*tasks)]


async def run_no_reuse(client, model: str, texts: Texts, a) -> list[Result]:
    """Random prompts nobody shares: the cost of PD when there is nothing to reuse."""
    rng = random.Random(a.seed + 2)
    tasks = []
    for gap in poisson_gaps(rng, a.rate, a.random_requests):
        await asyncio.sleep(gap)
        messages = [{"role": "user", "content": texts.make(a.random_tokens)}]
        tasks.append(asyncio.create_task(one_chat(client, model, messages, a.answer_tokens, "no_reuse")))
    return [r for r, _ in await asyncio.gather(*tasks)]


WORKLOADS = {"chat": run_chat, "doc_qa": run_doc_qa, "no_reuse": run_no_reuse}
