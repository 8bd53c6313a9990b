"""The HTTP side of ``lego serve``: OpenAI's completions, chat completions and models, as a LitServe spec.

LitServe's own ``OpenAISpec`` serves chat only, by a ``predict`` generator per request; the engine
is a continuous batch instead (:mod:`~lego_lightning.serve.worker`), so this spec puts each prompt's
work on LitServe's request queue and reads the tokens the worker streams back. Text is decoded here,
in the API process: stop strings cut it here, and a stop (or a client that leaves a stream) sends the
worker a cancellation, which frees the request's slot at the next engine step.

Admission is bounded: ``max_queue`` requests may be admitted and unanswered at once (decoding or
waiting for a slot); past it a request gets 429 at once, and while the server drains for shutdown,
503. Nothing else is kept per request, so memory does not grow with the load.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import pickle
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from lego_lightning.data.tokenizer import TextTokenizer
from lego_lightning.serve.protocol import (
    MAX_LOGPROBS,
    BadRequest,
    ChatBody,
    CompletionBody,
    Limits,
    Work,
    check_prompt,
    hold_back,
    max_new_tokens,
    prompts_of,
    refuse_unsupported,
    sampling_settings,
    stop_strings,
)
from lego_lightning.serve.worker import CANCEL


class DecodingFailed(Exception):
    """The worker failed a request (HTTP 500)."""


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    """OpenAI's error body, which its clients read into their exceptions."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


@dataclass
class Choice:
    """One prompt's answer as it arrives: its tokens, the text sent so far, and how it ended."""

    uid: str
    prompt: list[int]
    prompt_text: str  # decoded once: the continuation's text is what follows it
    echo: bool
    stops: list[str]
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finish_reason: str | None = None
    final: dict[str, Any] = field(default_factory=dict)


class OpenAISpec(LitSpec):
    """``POST /v1/completions``, ``POST /v1/chat/completions`` (with a chat template) and ``GET /v1/models``.

    Args:
        tokenizer: the model's tokenizer (prompts in, text out).
        limits: the model's context and vocabulary, and the default ``max_tokens``.
        defaults: the server's decoding settings (``Request``'s fields), which a request's
            ``temperature``, ``top_p``, ``top_k``, ``seed`` and ``max_tokens`` override.
        model_name: the id ``/v1/models`` lists.
        max_queue: requests admitted and unanswered at once; past it, 429.
        chat_template: a Jinja chat template (a Hugging Face tokenizer's); ``None``: chat is refused.
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        limits: Limits,
        defaults: dict[str, Any],
        model_name: str,
        max_queue: int = 64,
        chat_template: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue={max_queue!r}: allowed a positive integer (requests admitted at once)")
        self.api_path = "/v1/completions"
        self.tokenizer = tokenizer
        self.limits = limits
        self.defaults = dict(defaults)
        self.model_name = model_name
        self.max_queue = max_queue
        self.chat_template = chat_template
        # Shared with the API process (forked from this one): what a drain waits for, and whether it runs.
        self.in_flight = mp.Value("i", 0)
        self.draining = mp.Event()
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])

    def __getstate__(self) -> dict[str, Any]:
        # The inference worker gets the spec with the API (spawned, pickled): it needs none of the HTTP side.
        state = super().__getstate__()
        for name in ("in_flight", "draining", "tokenizer", "response_buffer", "data_streamer"):
            state[name] = None
        return state

    @property
    def stream(self) -> bool:
        return True

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        """The worker's payloads go out as they are (LitAPI's ``encode_response`` asks its spec)."""
        return output

    # ------------------------------------------------------------------------------- endpoints
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "lego_lightning"}],
        }

    async def completions(self, body: CompletionBody, http: HTTPRequest):
        try:
            refuse_unsupported(
                body,
                {
                    "n": 1,
                    "best_of": 1,
                    "presence_penalty": 0.0,
                    "frequency_penalty": 0.0,
                    "logit_bias": {},
                    "suffix": "",
                },
            )
            if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
                raise BadRequest("logprobs", f"{body.logprobs}: allowed 0 to {MAX_LOGPROBS}")
            if body.logprobs is not None and body.stream:
                raise BadRequest("logprobs", "not with stream=true: ask for them without streaming")
            prompts = prompts_of(body.prompt)
            works = [
                self._work(
                    p,
                    body,
                    i,
                    "prompt" if len(prompts) == 1 else f"prompt[{i}]",
                    body.max_tokens,
                    "max_tokens",
                    body.echo,
                    body.logprobs,
                )
                for i, p in enumerate(prompts)
            ]
            stops = stop_strings(body.stop)
        except BadRequest as error:
            return error_response(400, str(error), error.param)
        usage = bool((body.stream_options or {}).get("include_usage"))
        return await self._answer(works, stops, body.stream, "text_completion", usage)

    async def chat_completions(self, body: ChatBody, http: HTTPRequest):
        try:
            if self.chat_template is None:
                raise BadRequest(
                    "messages",
                    "this model's tokenizer has no chat template, so it cannot read messages: send text to "
                    "/v1/completions instead",
                )
            refuse_unsupported(
                body,
                {
                    "n": 1,
                    "presence_penalty": 0.0,
                    "frequency_penalty": 0.0,
                    "logit_bias": {},
                    "tools": [],
                    "logprobs": False,
                },
            )
            if body.response_format not in (None, {"type": "text"}):
                raise BadRequest("response_format", f"{body.response_format!r}: allowed only {{'type': 'text'}}")
            text = render_chat(self.chat_template, [m.model_dump() for m in body.messages])
            limit, name = (body.max_completion_tokens, "max_completion_tokens")
            if limit is None:
                limit, name = body.max_tokens, "max_tokens"
            works = [self._work(text, body, 0, "messages", limit, name, False, None)]
            stops = stop_strings(body.stop)
        except BadRequest as error:
            return error_response(400, str(error), error.param)
        usage = bool((body.stream_options or {}).get("include_usage"))
        return await self._answer(works, stops, body.stream, "chat.completion", usage)

    # ------------------------------------------------------------------------------- requests
    def _work(
        self,
        prompt: str | list[int],
        body: Any,
        index: int,
        field: str,
        limit: int | None,
        limit_field: str,
        echo: bool,
        logprobs: int | None,
    ) -> Work:
        """One prompt's work: tokenized and checked, its settings over the server's (a seed ``s`` gives the
        ``i``-th prompt ``s + i``, as ``lego generate`` gives its ``i``-th)."""
        ids = self.tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt(ids, self.limits, field)
        settings = dict(self.defaults) | sampling_settings(body, self.defaults)
        if settings.get("seed") is not None:
            settings["seed"] += index
        settings["max_new_tokens"] = max_new_tokens(limit, len(ids), self.limits, limit_field, allow_zero=echo)
        if settings["max_new_tokens"] == 0 and not echo:
            raise BadRequest(field, f"leaves no room in the model's context ({self.limits.context}) for a token")
        return Work(ids, settings, logprobs, echo)

    async def _answer(self, works: list[Work], stops: list[str], stream: bool, kind: str, usage: bool):
        if self.draining.is_set():
            return error_response(503, "the server is shutting down", kind="server_error")
        with self.in_flight.get_lock():
            if self.in_flight.value + len(works) > self.max_queue:
                return error_response(
                    429, f"the server is full ({self.max_queue} requests at once): retry later", kind="rate_limit"
                )
            self.in_flight.value += len(works)
        choices = [Choice(self._submit(w), w.prompt, self.tokenizer.decode(w.prompt), w.echo, stops) for w in works]
        if stream:
            return StreamingResponse(self._stream(choices, kind, usage), media_type="text/event-stream")
        try:
            for choice in choices:
                async for _ in self._receive(choice):
                    pass
        except DecodingFailed as error:
            return error_response(500, str(error), kind="server_error")
        finally:
            self._let_go(choices)
        return self._response(choices, kind)

    def _submit(self, work: Work) -> str:
        uid = str(uuid.uuid4())
        self.response_buffer[uid] = ResponseBufferItem(response_queue=deque(), event=asyncio.Event())
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), work.as_message()))
        return uid

    def _let_go(self, choices: list[Choice]) -> None:
        """A request answered or abandoned: a worker still decoding it is told to stop, and its place is free."""
        for choice in choices:
            if not choice.final:  # the worker has not ended it
                self.request_queue.put((self.response_queue_id, choice.uid, time.monotonic(), {CANCEL: True}))
            self.response_buffer.pop(choice.uid, None)
        with self.in_flight.get_lock():
            self.in_flight.value -= len(choices)

    async def _receive(self, choice: Choice) -> AsyncIterator[str]:
        """The new text of ``choice`` as its tokens arrive, until it ends (a stop string ends it here)."""
        item = self.response_buffer[choice.uid]
        async for data, status in self.data_streamer(item.response_queue, item.event, send_status=True):
            if status == LitAPIStatus.ERROR:
                payload = pickle.loads(data) if isinstance(data, bytes) else data
                payload = json.loads(payload) if isinstance(payload, str) else payload
                raise DecodingFailed(payload.get("error", "decoding failed") if isinstance(payload, dict) else payload)
            payload = json.loads(data)
            choice.tokens += payload["tokens"]
            if "finish_reason" in payload:
                choice.final = payload
            text, stopped = hold_back(self._text(choice), choice.stops)
            if stopped:
                choice.finish_reason = "stop"
            elif choice.final:
                text, choice.finish_reason = self._text(choice), payload["finish_reason"]
            new, choice.sent = text[len(choice.sent) :], text
            if new:
                yield new
            if choice.finish_reason is not None:
                return

    def _text(self, choice: Choice) -> str:
        """The continuation as it reads after the prompt (as ``lego generate`` writes it)."""
        return self.tokenizer.decode(choice.prompt + choice.tokens)[len(choice.prompt_text) :]

    async def _stream(self, choices: list[Choice], kind: str, usage: bool) -> AsyncIterator[str]:
        """Server-sent events, OpenAI's chunks, one prompt after the other (all decode at once meanwhile)."""
        head = {
            "id": answer_id(kind),
            "object": f"{kind}.chunk" if kind.startswith("chat") else kind,
            "created": int(time.time()),
            "model": self.model_name,
        }
        try:
            for index, choice in enumerate(choices):
                if kind.startswith("chat"):
                    yield sse(
                        head
                        | {
                            "choices": [
                                {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                            ]
                        }
                    )
                elif choice.echo:
                    yield sse(head | {"choices": [self._text_choice(index, choice.prompt_text)]})
                async for text in self._receive(choice):
                    delta = {"content": text} if kind.startswith("chat") else None
                    yield sse(head | {"choices": [self._chunk_choice(index, text, delta, None)]})
                yield sse(
                    head
                    | {
                        "choices": [
                            self._chunk_choice(index, "", {} if kind.startswith("chat") else None, choice.finish_reason)
                        ]
                    }
                )
            if usage:
                yield sse(head | {"choices": [], "usage": self._usage(choices)})
            yield "data: [DONE]\n\n"
        except DecodingFailed as error:
            yield sse({"error": {"message": str(error), "type": "server_error", "param": None, "code": None}})
        finally:
            self._let_go(choices)

    # ------------------------------------------------------------------------------- answers
    @staticmethod
    def _text_choice(index: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _chunk_choice(self, index: int, text: str, delta: dict | None, finish_reason: str | None) -> dict[str, Any]:
        if delta is not None:
            return {"index": index, "delta": delta, "finish_reason": finish_reason}
        return self._text_choice(index, text, finish_reason)

    def _usage(self, choices: list[Choice]) -> dict[str, Any]:
        prompt = sum(len(c.prompt) for c in choices)
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _response(self, choices: list[Choice], kind: str) -> dict[str, Any]:
        out = []
        for index, choice in enumerate(choices):
            text = (choice.prompt_text if choice.echo else "") + choice.sent
            if kind.startswith("chat"):
                out.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": choice.finish_reason,
                    }
                )
            else:
                entry = self._text_choice(index, text, choice.finish_reason)
                if "logprobs" in choice.final:  # scored by the worker, as asked
                    entry["logprobs"] = self._logprobs(choice)
                out.append(entry)
        return {
            "id": answer_id(kind),
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": out,
            "usage": self._usage(choices),
            # Not OpenAI's: what self-speculative decoding did. Clients ignore fields they do not know.
            "lego": {
                "drafts": sum(c.final.get("drafts", 0) for c in choices),
                "accepted": sum(c.final.get("accepted", 0) for c in choices),
            },
        }

    def _logprobs(self, choice: Choice) -> dict[str, Any]:
        """OpenAI's completion logprobs: each token's text, log-probability, most likely alternatives (as many as
        asked) and offset; the prompt's tokens too with ``echo`` (its first has no log-probability)."""
        scored = choice.final["logprobs"]
        start = 0 if choice.echo else len(choice.prompt)
        ids = (choice.prompt + choice.tokens)[start:]
        words = [self.tokenizer.decode([t]) for t in ids]
        offsets, at = [], 0
        for word in words:
            offsets.append(at)
            at += len(word)
        tops = []
        for top_ids, top_values in zip(scored["top_ids"][start:], scored["top_logprobs"][start:]):
            tops.append(
                None if top_ids is None else {self.tokenizer.decode([t]): v for t, v in zip(top_ids, top_values)}
            )
        return {
            "tokens": words,
            "token_logprobs": scored["token_logprobs"][start:],
            "top_logprobs": tops,
            "text_offset": offsets,
        }


def answer_id(kind: str) -> str:
    return f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:12]}"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def render_chat(template: str, messages: list[dict[str, Any]]) -> str:
    """``messages`` as the model's chat template writes them, ready for the assistant's turn (as transformers'
    ``apply_chat_template(..., add_generation_prompt=True)``, in the same sandbox)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(messages=messages, add_generation_prompt=True)
    except TemplateError as error:
        raise BadRequest("messages", f"the chat template refused them: {error}") from None


def chat_template_of(source: str | Path | None) -> str | None:
    """The chat template beside a tokenizer (a Hugging Face folder's ``chat_template.jinja`` or the
    ``chat_template`` of its ``tokenizer_config.json``), or ``None`` (a ``lego fit`` checkpoint has none)."""
    if source is None:
        return None
    path = Path(source).expanduser()
    folder = path if path.is_dir() else path.parent if path.suffix == ".json" else None
    if folder is None:
        return None
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
