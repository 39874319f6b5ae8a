"""Validation of client requests at the edge: OpenAI completions and chat completions.

Only what the router must rely on is checked, strictly (``"stream": "false"`` or ``"max_tokens": true`` is a 400,
not a guess); every other field passes through to vLLM unchanged (vLLM validates the rest and its 4xx errors are
relayed). Internal fields a client must never set (``kv_transfer_params``, also inside ``vllm_xargs``) are
removed. A body that is not UTF-8, not JSON or nested too deep is a 400, never a 500.

A completion ``prompt`` (:func:`check_prompt`) is a string, a non-empty list of token ids, a non-empty list of
strings, or a non-empty list of non-empty token-id lists; a token id is a JSON integer (not a boolean, not a
float) in ``[0, 2**31)``, the range of the engines' int32 token ids and of the router's own prompt keys. Anything
else is a 400 with ``param`` ``"prompt"`` and the offending position in the message.

A request asks for :func:`request_parts` sequences: its prompts (a batched completion's, else 1) times ``n``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from pdmesh.router.errors import OpenAIError

INTERNAL_FIELDS = ("kv_transfer_params",)
MAX_N = 128  # samples per prompt
TOKEN_ID_LIMIT = 2**31  # token ids are in [0, TOKEN_ID_LIMIT)


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", strict=False)

    model: str = Field(min_length=1)
    stream: StrictBool = False
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    # n samples of one prompt: prefilled (and pushed) once, sampled n times on the decode worker
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)


class CompletionRequest(_Base):
    prompt: Any  # required; its shape is checked by check_prompt (clearer errors than a pydantic union)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(min_length=1)
    content: Any = None


class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)


Kind = Literal["completions", "chat"]


def parse_request(raw: bytes, kind: Kind) -> dict:
    """Parse and validate a request body; returns the JSON object with internal fields removed.

    Raises :class:`OpenAIError` 400 with the offending parameter named.
    """
    obj = json_object(raw)
    model_cls = CompletionRequest if kind == "completions" else ChatRequest
    try:
        model_cls.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise OpenAIError(
            400, f"{param}: {msg}" if param else msg, param=param, code="invalid_request"
        ) from None
    if kind == "completions":
        check_prompt(obj["prompt"])
    return obj


_TokenId = Annotated[int, msgspec.Meta(ge=0, lt=TOKEN_ID_LIMIT)]
_TokenIds = Annotated[list[_TokenId], msgspec.Meta(min_length=1)]
_PROMPT_SHAPES = "a string, a list of token ids, a list of strings or a list of token-id lists"


def check_prompt(prompt: object) -> None:
    """Raise :class:`OpenAIError` 400 (``param`` ``"prompt"``, code ``invalid_request``) unless ``prompt`` has one
    of the shapes of the module docstring. Token ids are checked in C (msgspec): ~3 ms for 128k ids."""
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list):
        raise _bad_prompt(f"prompt must be {_PROMPT_SHAPES}")
    if not prompt:
        raise _bad_prompt("prompt must not be empty")
    first = prompt[0]
    if isinstance(first, str):
        shape, expected = list[str], "a string, like the batch's first prompt"
    elif isinstance(first, list):
        shape, expected = list[_TokenIds], "a token-id list, like the batch's first prompt"
    else:
        shape, expected = _TokenIds, ""
    try:
        msgspec.convert(prompt, shape)
    except msgspec.ValidationError as e:
        detail, _, path = str(e).partition(" - at `$")
        where = "prompt" + path.rstrip("`")
        if "length >=" in detail:
            raise _bad_prompt(f"{where} must not be empty (a prompt needs at least one token id)") from None
        if "Expected `int`" in detail:
            raise _bad_prompt(
                f"{where}: a token id must be an integer in [0, {TOKEN_ID_LIMIT}), not {_shown(prompt, path)}"
            ) from None
        raise _bad_prompt(f"{where} must be {expected or 'a token id'}") from None


def _shown(prompt: list, path: str) -> str:
    """The value at a msgspec error path such as ``[1][3]`` of ``prompt``, shortened for a message."""
    value: object = prompt
    for index in path.rstrip("`").strip("[]").split("]["):
        if not (index.isdigit() and isinstance(value, list) and int(index) < len(value)):
            break
        value = value[int(index)]
    return msgspec.json.encode(value).decode()[:40]


def _bad_prompt(message: str) -> OpenAIError:
    return OpenAIError(400, message, param="prompt", code="invalid_request")


def request_parts(body: dict) -> int:
    """The sequences a validated request asks for: its prompts (a batched completion's, else 1) times ``n``.
    Each is admitted as one request against the admission limits (:mod:`router.limits`)."""
    prompt = body.get("prompt")
    batched = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    return (len(prompt) if batched else 1) * int(body.get("n", 1))  # type: ignore[arg-type]


def check_parts(body: dict, max_parts: int) -> int:
    """:func:`request_parts` of a validated request, or :class:`OpenAIError` 400 ``too_many_parts`` when it is
    more than ``max_parts`` (``param`` ``"prompt"`` for a batch of prompts, else ``"n"``)."""
    parts = request_parts(body)
    if parts <= max_parts:
        return parts
    n = int(body.get("n", 1))
    prompts = parts // n
    asked = f"{prompts} prompts x n={n}" if prompts > 1 else f"n={n}"
    raise OpenAIError(
        400,
        f"this request asks for {parts} sequences ({asked}); this router takes at most {max_parts} per request",
        param="prompt" if prompts > 1 else "n",
        code="too_many_parts",
    )


def json_object(raw: bytes) -> dict:
    """A request body as a JSON object, with the internal fields a client must never set removed (also inside
    ``vllm_xargs``). Raises :class:`OpenAIError` 400 for a body that is not UTF-8, not JSON, nested too deep or
    not an object."""
    try:
        obj = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise OpenAIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise OpenAIError(400, "request body must be a JSON object", code="invalid_request")
    for name in INTERNAL_FIELDS:
        obj.pop(name, None)
        xargs = obj.get("vllm_xargs")
        if isinstance(xargs, dict):
            xargs.pop(name, None)
    _drop_media_uuids(obj)
    return obj


def _drop_media_uuids(obj: dict) -> None:
    """Remove client-chosen ids of multimodal inputs (content parts' ``uuid``, ``multi_modal_uuids``): vLLM would
    use them as the inputs' content hashes, which key cached KV cluster-wide; a client that guessed another's id
    could otherwise plant KV for it. The engines hash the content themselves instead."""
    obj.pop("multi_modal_uuids", None)
    for part in content_parts(obj):
        part.pop("uuid", None)


def content_parts(body: dict) -> Iterator[dict]:
    """Every content part (an object) of the body's chat messages, in order; nothing for a completion body or
    malformed messages (their own validation reports those)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            yield from (part for part in content if isinstance(part, dict))


# what a prefill leg never needs: its one token is thrown away, only the prompt's KV matters
_PREFILL_DROPS = (
    "stream_options",
    "min_tokens",
    "best_of",
    "echo",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
)


def one_token_leg(body: dict) -> dict:
    """The same request limited to a single output token and one sample, not streamed: every prefill leg's shape."""
    leg = {k: v for k, v in body.items() if k not in _PREFILL_DROPS}
    leg["stream"] = False
    leg["max_tokens"] = 1
    leg["n"] = 1
    if "max_completion_tokens" in leg:
        leg["max_completion_tokens"] = 1
    return leg


def batched_prompts(body: dict) -> list[dict] | None:
    """A completion request with several prompts as one request per prompt (vLLM's order), else None.

    ``prompt`` as a list of strings or a list of token-id lists with more than one element is a batch; one string,
    one token-id list, or a list holding a single prompt is not."""
    prompt = body.get("prompt")
    if not isinstance(prompt, list) or len(prompt) < 2 or not isinstance(prompt[0], (str, list)):
        return None
    return [{**body, "prompt": p} for p in prompt]


def needs_prompt_logits(body: dict) -> bool:
    """Does the answer need the logits of the prompt's own tokens (``prompt_logprobs``, or ``echo`` with
    ``logprobs`` on completions)? Then the engine that answers must compute the prompt itself: vLLM never reads
    KV from outside for such a request, so a prefill leg would be wasted."""
    if body.get("prompt_logprobs") is not None:
        return True
    return bool(body.get("echo")) and body.get("logprobs") is not None


def estimate_prompt_tokens(body: dict) -> int:
    """A cheap token count of a request's prompt, for load signals only: token ids counted, text at ~4 characters
    per token (no tokenizer call on the hot path)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    chars = sum(len(str(m.get("content") or "")) for m in body.get("messages") or [] if isinstance(m, dict))
    return chars // 4 + 1
