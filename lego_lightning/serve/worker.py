"""The inference side of ``lego serve``: the decoding engine's slots, driven by LitServe's continuous batching loop.

LitServe runs this in its own worker process. Its loop takes requests off the queue while the
engine decodes (``add_request``, ``has_capacity``) and calls :meth:`EngineAPI.step` for one engine
step after another. A request reaches the engine between two steps, never inside one: requests
arrive on the loop's thread and the steps run on another, so arrivals and cancellations wait in an
inbox that each step empties first. Each step sends every request the tokens the full model
verified in it, and a request that ends its last tokens and what it cost.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any

import litserve as ls
import torch
from fastapi import Header, HTTPException
from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.utils import LitAPIStatus

from lego_lightning.decoding import Completion, Engine, Request
from lego_lightning.model.transformer import ExitTransformer

log = logging.getLogger(__name__)

CANCEL = "cancel"  # a queue message {CANCEL: True} under a request's uid: its client is gone
OPENAI_FINISH_REASON = {"eos": "stop", "length": "length", "cancelled": "cancelled"}  # the engine's, in OpenAI's words


class EngineLoop(ContinuousBatchingLoop):
    """LitServe's continuous batching loop, with cancellations and an idle wait.

    A cancellation is taken at once, even when every slot is busy (LitServe's loop would queue it behind
    the requests waiting for a slot), and a cancelled request that never got a slot is dropped from the
    wait. With nothing to decode the loop sleeps a little instead of spinning a core.
    """

    IDLE_SLEEP = 0.002

    async def prefill(
        self, pending, lit_api, lit_spec, request_queue, transport, max_batch_size=None, batch_timeout=None
    ):
        while pending and self.has_capacity(lit_api):
            response_queue_id, uid, message = pending.pop(0)
            self.response_queue_ids[uid] = response_queue_id
            self.add_request(uid, message, lit_api, lit_spec, transport)
        item = await asyncio.to_thread(self.get_request, request_queue, timeout=0.05, block=True)
        if item is None:
            return pending
        response_queue_id, uid, _, message = item
        if message.get(CANCEL):
            waiting = [p for p in pending if p[1] != uid]
            if len(waiting) == len(pending):
                lit_api.cancel(uid)
            return waiting
        if self.has_capacity(lit_api):
            self.response_queue_ids[uid] = response_queue_id
            self.add_request(uid, message, lit_api, lit_spec, transport)
        else:
            pending.append((response_queue_id, uid, message))
        return pending

    async def run(self, lit_api, *args, **kwargs):
        if not lit_api.has_active_requests():
            await asyncio.sleep(self.IDLE_SLEEP)
            return
        await super().run(lit_api, *args, **kwargs)


class EngineAPI(ls.LitAPI):
    """The engine behind LitServe: ``slots`` requests decode at once, the others wait for a slot.

    Args:
        model: the model to decode with (moved to the worker's device in :meth:`setup`).
        spec: the OpenAI spec that turns HTTP requests into work (:class:`~lego_lightning.serve.spec.OpenAISpec`).
        slots: requests decoded at once (the engine's slots).
        engine: the engine's own settings (``threshold``, ``confidence``, ``hidden_confidence``,
            ``max_speculations``).
        api_key: a request must carry ``Authorization: Bearer <api_key>`` (``None``: no key asked).
    """

    def __init__(
        self,
        model: ExitTransformer,
        spec: ls.LitSpec,
        slots: int = 8,
        engine: dict[str, Any] | None = None,
        api_key: str | None = None,
    ) -> None:
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots={slots!r}: allowed a positive integer (requests decoded at once)")
        super().__init__(max_batch_size=slots, stream=True, spec=spec, loop=EngineLoop())
        self.model = model
        self.slots = slots
        self.engine_settings = dict(engine or {})
        self.api_key = api_key

    # ------------------------------------------------------------------ the HTTP side (API process)
    def authorize(self, authorization: str | None = Header(None)) -> None:
        """Every endpoint's dependency: without the key, a 401 and nothing runs."""
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            raise HTTPException(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'")

    # ------------------------------------------------------------------ the worker process
    def setup(self, device: str) -> None:
        self.model = self.model.to(device).eval()
        self.engine = self.new_engine(self.slots)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # (uid, message) from the loop's thread
        self.lock = threading.Lock()
        self.taken = 0  # requests handed to this worker and not yet ended: the slots they hold or will
        self.uid_of: dict[int, str] = {}  # engine request id -> LitServe uid
        self.id_of: dict[str, int] = {}
        self.work: dict[str, dict[str, Any]] = {}
        self.sent: dict[str, list[int]] = {}  # the tokens each request has been sent (what a resumed one continues)

    def new_engine(self, slots: int) -> Engine:
        """An engine of ``slots`` slots with the server's settings: the worker's, and a probe's after a failed step."""
        return Engine(self.model, slots, **self.engine_settings)

    def has_capacity(self) -> bool:
        with self.lock:
            return self.taken < self.slots

    def has_active_requests(self) -> bool:
        with self.lock:
            return self.taken > 0

    def add_request(self, uid: str, message: dict[str, Any]) -> None:
        with self.lock:
            self.taken += 1
        self.inbox.put((uid, message))

    def cancel(self, uid: str) -> None:
        self.inbox.put((uid, {CANCEL: True}))

    def step(self, prev_outputs: list[Output] | None) -> list[Output]:
        """One engine step for every request in a slot, after the requests that arrived since the last one."""
        outputs: list[Output] = []
        self._take_inbox(outputs)
        if self.engine.busy:
            try:
                events = self.engine.step()
            except Exception as error:
                log.exception("an engine step failed: finding the request that fails it")
                self._recover(error, outputs)
                return outputs
            for event in events:
                uid = self.uid_of[event.id]
                self.sent[uid] += event.tokens
                if event.completion is None:
                    outputs.append(Output(uid, {"tokens": event.tokens}, LitAPIStatus.OK))
                else:
                    self._finish(uid, event.tokens, event.completion, outputs)
        return outputs

    def _take_inbox(self, outputs: list[Output]) -> None:
        while True:
            try:
                uid, message = self.inbox.get_nowait()
            except queue.Empty:
                return
            if message.get(CANCEL):
                if uid in self.id_of:
                    completion = self.engine.cancel(self.id_of[uid])
                    if completion is not None:
                        self._finish(uid, [], completion, outputs)
                continue
            self.work[uid] = message
            try:
                if message["settings"]["max_new_tokens"] == 0:  # scoring only: no decoding
                    prompt = message["prompt"]
                    self._finish(uid, [], Completion(-1, len(prompt), [], [], "length"), outputs)
                    continue
                request_id = self.engine.add(Request(message["prompt"], **message["settings"]))
            except Exception as error:
                self._fail(uid, error, outputs)
                continue
            self.uid_of[request_id], self.id_of[uid] = uid, request_id
            self.sent[uid] = []

    def _recover(self, error: Exception, outputs: list[Output]) -> None:
        """After a step that raised: the requests it held share its passes (and its cache, perhaps half written), so
        each one runs a step alone in a probe engine. One that fails there fails (500); the others go on in a
        fresh engine from the tokens they were sent (greedy: the same tokens; sampled: the same distribution, a
        new stream from the seed). Where none fails alone, the fault is not one request's: they all fail."""
        held = list(self.id_of)
        self.engine = self.new_engine(self.slots)
        self.uid_of.clear()
        self.id_of.clear()
        resumed = {}
        for uid in held:
            message, sent = self.work[uid], self.sent[uid]
            settings = message["settings"] | {"max_new_tokens": message["settings"]["max_new_tokens"] - len(sent)}
            request = Request(message["prompt"] + sent, **settings)
            try:
                probe = self.new_engine(1)
                probe.add(request)
                probe.step()
            except Exception as alone:
                self._fail(uid, alone, outputs)
                continue
            resumed[uid] = request
        if len(resumed) == len(held):  # every one ran alone: failing again together would loop for ever
            for uid in resumed:
                self._fail(uid, error, outputs)
            return
        for uid, request in resumed.items():
            request_id = self.engine.add(request)
            self.uid_of[request_id], self.id_of[uid] = uid, request_id

    def _finish(self, uid: str, tokens: list[int], completion: Completion, outputs: list[Output]) -> None:
        message, sent = self.work.pop(uid), self.sent.pop(uid, [])
        self._release(uid)
        final: dict[str, Any] = {
            "tokens": tokens,
            "finish_reason": OPENAI_FINISH_REASON[completion.finish_reason],
            "drafts": completion.drafts,
            "accepted": completion.accepted,
        }
        try:
            if message["logprobs"] is not None and completion.finish_reason != "cancelled":
                final["logprobs"] = score(self.model, message["prompt"] + sent, message["logprobs"])
        except Exception as error:
            self._fail(uid, error, outputs, released=True)
            return
        outputs.append(Output(uid, final, LitAPIStatus.OK))
        outputs.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))

    def _fail(self, uid: str, error: Exception, outputs: list[Output], released: bool = False) -> None:
        log.error("request %s failed: %r", uid, error)
        self.work.pop(uid, None)
        self.sent.pop(uid, None)
        if not released:
            self._release(uid)
        outputs.append(Output(uid, {"error": f"decoding failed: {error}"}, LitAPIStatus.ERROR))

    def _release(self, uid: str) -> None:
        request_id = self.id_of.pop(uid, None)
        self.uid_of.pop(request_id, None)
        with self.lock:
            self.taken -= 1


@torch.no_grad()
def score(model: ExitTransformer, ids: list[int], top: int) -> dict[str, Any]:
    """Each token's log-probability under the full model given those before it (the first has none), and the
    ``top`` most likely tokens at each position: one full-depth pass over the sequence."""
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device), exit_layers=[model.exit_layers[-1]])[model.exit_layers[-1]]
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0]
    best = logprobs.topk(top, dim=-1) if top > 0 else None
    return {
        "token_logprobs": [None, *chosen.tolist()],
        "top_ids": [None, *(best.indices.tolist() if best is not None else [[] for _ in ids[1:]])],
        "top_logprobs": [None, *(best.values.tolist() if best is not None else [[] for _ in ids[1:]])],
    }
