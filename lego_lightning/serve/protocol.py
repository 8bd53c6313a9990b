"""What an OpenAI client may send ``lego serve``, checked into work for the engine before anything runs.

The bodies follow OpenAI's ``/v1/completions`` and ``/v1/chat/completions``. Fields a client library
sends by habit (``user``, ``stream_options``...) are ignored; fields that would change the text and that
the engine does not do (``n`` above 1, ``best_of``, penalties, ``logit_bias``, ``suffix``, tools) are
refused with a 400 that names them, rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

# OpenAI's own bounds, kept where the engine has no tighter one.
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 2.0


class BadRequest(ValueError):
    """A request the server refuses before any work (HTTP 400): ``param`` is the field, the message says why."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class CompletionBody(BaseModel):
    """``POST /v1/completions``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's; vLLM and others take it too
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    stream_options: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str


class ChatBody(BaseModel):
    """``POST /v1/chat/completions``: text messages only."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int | None = None
    logprobs: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class Limits:
    """What the server admits: the model's context, its vocabulary, and the default ``max_tokens``."""

    context: int
    vocab_size: int
    default_max_tokens: int


@dataclass
class Work:
    """One prompt's work for the engine: its tokens, the request's settings (``Request``'s fields), whether
    to score its tokens (``logprobs``: how many top tokens per position, ``None``: no scoring) and to echo
    the prompt. ``max_new_tokens`` 0 only scores (``echo`` with ``max_tokens=0``)."""

    prompt: list[int]
    settings: dict[str, Any]
    logprobs: int | None = None
    echo: bool = False

    def as_message(self) -> dict[str, Any]:
        """A plain dict, what crosses to the inference worker."""
        return {"prompt": self.prompt, "settings": self.settings, "logprobs": self.logprobs, "echo": self.echo}


def refuse_unsupported(body: BaseModel, fields: dict[str, Any]) -> None:
    """A 400 for each field set to something other than its only allowed value (``fields``: name -> allowed)."""
    for name, allowed in fields.items():
        value = getattr(body, name, None)
        if value is not None and value != allowed:
            raise BadRequest(name, f"{value!r} is not supported: allowed {allowed!r} (or leave it out)")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if len(strings) > MAX_STOP_STRINGS:
        raise BadRequest("stop", f"{len(strings)} strings: allowed at most {MAX_STOP_STRINGS}")
    if any(s == "" for s in strings):
        raise BadRequest("stop", "an empty string would stop at once: allowed non-empty strings")
    return strings


def sampling_settings(body: BaseModel, defaults: dict[str, Any]) -> dict[str, Any]:
    """The request's sampling over the server's defaults, each in range (else a 400 naming it)."""
    settings = {k: defaults[k] for k in ("temperature", "top_k", "top_p", "seed") if k in defaults}
    if body.temperature is not None:
        if not 0.0 <= body.temperature <= MAX_TEMPERATURE:
            raise BadRequest("temperature", f"{body.temperature}: allowed 0 (greedy) to {MAX_TEMPERATURE}")
        settings["temperature"] = body.temperature
    if body.top_p is not None:
        if not 0.0 < body.top_p <= 1.0:
            raise BadRequest("top_p", f"{body.top_p}: allowed above 0 and at most 1")
        settings["top_p"] = None if body.top_p == 1.0 else body.top_p
    if body.top_k is not None:
        if body.top_k < 1:
            raise BadRequest("top_k", f"{body.top_k}: allowed a positive integer")
        settings["top_k"] = body.top_k
    if body.seed is not None:
        settings["seed"] = body.seed
    return settings


def max_new_tokens(requested: int | None, prompt_length: int, limits: Limits, field: str, allow_zero: bool) -> int:
    """``max_tokens`` in range: what the prompt leaves of the context. Left out: the server's default, shortened
    to what the prompt leaves."""
    room = limits.context - prompt_length
    if requested is None:
        return max(0, min(limits.default_max_tokens, room))
    least = 0 if allow_zero else 1
    if requested < least:
        allowed = "0 (with echo: score the prompt only) or more" if allow_zero else "1 or more"
        raise BadRequest(field, f"{requested}: allowed {allowed}")
    if requested > room:
        raise BadRequest(
            field,
            f"{requested}: the prompt has {prompt_length} tokens and the model's context is {limits.context}, "
            f"so allowed at most {room}",
        )
    return requested


def check_prompt(ids: list[int], limits: Limits, field: str) -> None:
    if not ids:
        raise BadRequest(field, "has no tokens: allowed a prompt of at least one token")
    if len(ids) > limits.context:
        raise BadRequest(field, f"has {len(ids)} tokens: allowed at most the model's context, {limits.context}")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise BadRequest(field, f"token ids {bad[:5]} are outside the vocabulary 0..{limits.vocab_size - 1}")


def prompts_of(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a ``prompt`` field: a text, texts, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise BadRequest("prompt", "is an empty list: allowed a text, a list of texts or of token ids")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def hold_back(text: str, stops: list[str]) -> tuple[str, bool]:
    """What of ``text`` may go to the client now: cut at the first stop string (and ``True``), else all but a
    tail that could still become a stop string or an unfinished character (``False``)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if cuts:
        return text[: min(cuts)], True
    keep = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = min(keep, len(text) - n)
                break
    while keep > 0 and text[keep - 1] == "\ufffd":  # a byte-level token's half character: wait for the rest
        keep -= 1
    return text[:keep], False
