"""`lego serve`: a real server on 127.0.0.1 (the `lego` command in a subprocess), spoken to by the `openai` client.

Every request loop here is bounded in count and time, and every server is stopped by its test.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
from litserve.utils import LitAPIStatus

from lego_lightning import ASHEM
from lego_lightning.decoding import Engine, Request
from lego_lightning.generation import tokenizer_of
from lego_lightning.serve.protocol import hold_back
from lego_lightning.serve.spec import chat_template_of, render_chat
from lego_lightning.serve.worker import EngineAPI
from tests.helpers import subprocess_env
from tests.test_generate_cli import PROMPTS, lego_generate

KEY = "test-key"
START_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def lego_serve(*arguments: str):
    """``lego serve ARGUMENTS`` in a subprocess on a free port of 127.0.0.1, up when this yields; stopped (SIGTERM, then
    killed if it must be) when the block ends. Yields the process and the base URL."""
    port = free_port()
    command = [sys.executable, "-m", "lego_lightning.cli", "serve", "--port", str(port), "--api_key", KEY, *arguments]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health", headers=auth(), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            process.kill()
            pytest.fail(f"lego serve did not start: {process.communicate()[0].decode()[-3000:]}")
        yield process, url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def exits(demo_checkpoint) -> list[int]:
    return torch.load(demo_checkpoint, weights_only=True)["model_config"]["exit_layers"]


@pytest.fixture(scope="module")
def server(demo_checkpoint, exits):
    """Self-speculative from the first exit, 4 slots, at most 8 requests admitted."""
    flags = ["--draft_exit", str(exits[0]), "--num_speculations", "3", "--slots", "4", "--max_queue", "8",
             "--max_new_tokens", "10"]  # fmt: skip
    with lego_serve("--ckpt_path", str(demo_checkpoint), *flags) as (_, url):
        yield url


def test_completions_give_lego_generates_text_greedy_and_sampled_streaming_or_not(server, demo_checkpoint, exits,
                                                                                 tmp_path):  # fmt: skip
    drafting = ["--draft_exit", str(exits[0]), "--num_speculations", "3", "--max_new_tokens", "10"]
    common = ["--ckpt_path", str(demo_checkpoint), *[a for p in PROMPTS for a in ("--prompt", p)], *drafting]
    greedy = lego_generate(*common, "--output", str(tmp_path / "greedy.jsonl"))
    sampling = ["--temperature", "1.0", "--top_p", "0.9", "--seed", "3"]
    sampled = lego_generate(*common, *sampling, "--output", str(tmp_path / "sampled.jsonl"))
    api = client(server)

    answer = api.completions.create(model="any", prompt=PROMPTS, max_tokens=10, temperature=0)
    assert [c.text for c in answer.choices] == [r["text"] for r in greedy]
    assert [c.finish_reason for c in answer.choices] == ["length"] * len(PROMPTS)
    assert answer.usage.completion_tokens == 10 * len(PROMPTS)
    assert answer.usage.prompt_tokens == sum(len(tokenizer_of(demo_checkpoint).encode_prompt(p)) for p in PROMPTS)
    assert answer.model_extra["lego"]["drafts"] >= answer.model_extra["lego"]["accepted"] > 0
    # Sampled: the same seed gives the same tokens (prompt i of a request samples with seed + i, as lego generate).
    answer = api.completions.create(model="any", prompt=PROMPTS, max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert [c.text for c in answer.choices] == [r["text"] for r in sampled]
    # One prompt alone, streamed: the chunks join into the same text, and the last says why it ended.
    chunks = list(api.completions.create(model="any", prompt=PROMPTS[1], max_tokens=10, temperature=1.0, top_p=0.9,
                                         seed=4, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == sampled[1]["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_strings_cut_the_text_and_end_the_request(server):
    api = client(server)
    full = api.completions.create(model="any", prompt=PROMPTS[0], max_tokens=10).choices[0].text
    stop = full.split()[2]  # a word inside the continuation
    cut = api.completions.create(model="any", prompt=PROMPTS[0], max_tokens=10, stop=[stop]).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    streamed = api.completions.create(model="any", prompt=PROMPTS[0], max_tokens=10, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_echo_and_logprobs_score_a_text_as_the_modules_own_loss(server, demo_checkpoint):
    text = "the king of the city was built in the war"
    scored = client(server).completions.create(model="any", prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == text
    logprobs = choice.logprobs.token_logprobs
    assert logprobs[0] is None and len(logprobs) == len(choice.logprobs.tokens)
    assert all(len(top) == 2 and max(top.values()) >= lp - 1e-5 for top, lp in
               zip(choice.logprobs.top_logprobs[1:], logprobs[1:]))  # fmt: skip
    module = ASHEM.load_from_checkpoint(demo_checkpoint, map_location="cpu").eval()
    ids = torch.tensor([tokenizer_of(demo_checkpoint).encode_prompt(text)])
    last = module.model.exit_layers[-1]
    with torch.no_grad():
        logits = module.model(ids, exit_layers=[last])[last]
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert sum(logprobs[1:]) == pytest.approx(-loss.item() * (ids.shape[1] - 1), rel=1e-4)


def test_bad_requests_get_a_400_that_names_the_field_and_nothing_runs(server, demo_checkpoint):
    api = client(server)
    cases = {
        "max_tokens": dict(prompt="the", max_tokens=100_000),
        "temperature": dict(prompt="the", temperature=5.0),
        "top_p": dict(prompt="the", top_p=0.0),
        "n": dict(prompt="the", n=2),
        "logprobs": dict(prompt="the", logprobs=50),
        "stop": dict(prompt="the", stop=["a", "b", "c", "d", "e"]),
        "prompt": dict(prompt="the " * 500),
    }
    for field, body in cases.items():
        with pytest.raises(openai.BadRequestError) as error:
            api.completions.create(model="any", **body)
        assert error.value.status_code == 400 and error.value.body["param"] == field, field
        assert field in error.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="chat template"):
        api.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
    for raw in (b"{not json", json.dumps({"prompt": "the", "max_tokens": "ten"}).encode(), b"[]"):
        answer = httpx.post(
            f"{server}/v1/completions", content=raw, headers=auth() | {"Content-Type": "application/json"}
        )
        assert answer.status_code == 400, raw
        assert "error" in answer.json()
    too_big = httpx.post(f"{server}/v1/completions", content=b"x" * 2_000_000, headers=auth())
    assert too_big.status_code == 413
    assert [m.id for m in api.models.list().data] == [demo_checkpoint.stem]


def test_a_request_without_the_key_gets_401(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").completions.create(model="any", prompt="the", max_tokens=2)
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "the"}).status_code == 401
    assert httpx.get(f"{server}/v1/models").status_code == 401


def test_past_the_queue_requests_get_429_at_once_and_the_admitted_ones_finish(server):
    results: list[int | str] = []

    def ask() -> None:
        try:
            answer = client(server).completions.create(model="any", prompt=PROMPTS[0], max_tokens=25)
            results.append(len(answer.choices[0].text) and 200)
        except openai.RateLimitError:
            results.append(429)
        except Exception as error:
            results.append(repr(error))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 16 and set(results) <= {200, 429}, results  # answered or refused: none lost or failed
    assert results.count(200) >= 8  # max_queue 8: the first 8 are admitted whatever the timing
    # Nine prompts at once are more than the server admits: refused at once, and nothing of them runs.
    start = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        client(server).completions.create(model="any", prompt=[PROMPTS[0]] * 9, max_tokens=25)
    assert time.monotonic() - start < 5


def test_dropped_streams_free_their_slots_and_the_others_finish_right(server):
    api = client(server)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    expected = [c.text for c in api.completions.create(model="any", prompt=prompts[:3], max_tokens=25).choices]
    streams = [httpx.Client(timeout=60) for _ in prompts]
    opened = []
    for s, prompt in zip(streams, prompts):
        body = {"prompt": prompt, "max_tokens": 25, "stream": True}
        response = s.send(s.build_request("POST", f"{server}/v1/completions", headers=auth(), json=body), stream=True)
        opened.append(response)
    for response in opened[4:]:  # 4 clients go away mid-stream
        response.close()
    extra = api.completions.create(model="any", prompt=PROMPTS[2], max_tokens=5)  # served meanwhile
    assert extra.choices[0].finish_reason == "length"
    for i, response in enumerate(opened[:4]):
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert text == expected[i % 3]
    for s in streams:
        s.close()


def test_clients_that_leave_at_once_give_their_places_back(server):
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 25, "stream": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip
    for _ in range(12):  # more than max_queue (8): each would hold a place for good if it were never given back
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(request)
    deadline = time.monotonic() + 60
    while True:  # the server may still be finishing them; then all 8 places are free again
        try:
            answer = client(server).completions.create(model="any", prompt=[PROMPTS[0]] * 8, max_tokens=3)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the places of clients that left were not given back"
            time.sleep(0.5)
    assert [c.finish_reason for c in answer.choices] == ["length"] * 8


def test_sigterm_finishes_the_requests_in_flight_refuses_new_ones_and_exits_0(demo_checkpoint):
    with lego_serve("--ckpt_path", str(demo_checkpoint), "--slots", "2", "--grace_period", "60") as (process, url):
        answers: list = []
        asking = threading.Thread(target=lambda: answers.append(client(url).completions.create(
            model="any", prompt=PROMPTS[0], max_tokens=25)))  # fmt: skip
        asking.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            refused = httpx.post(
                f"{url}/v1/completions", json={"prompt": "the"}, headers=auth(), timeout=10
            ).status_code
        except httpx.HTTPError:
            refused = "closed"
        asking.join(timeout=120)
        assert process.wait(timeout=90) == 0
    assert answers and answers[0].choices[0].finish_reason == "length"
    assert refused in (503, "closed")


# ------------------------------------------------------------------------ the parts, without a server
@pytest.fixture(scope="module")
def model(demo_checkpoint):
    return ASHEM.load_from_checkpoint(demo_checkpoint, map_location="cpu").eval().model


def worker(model, slots: int, engine_class: type[Engine] = Engine) -> EngineAPI:
    """The worker as LitServe sets it up in its process, its engines of ``engine_class``."""

    class Worker(EngineAPI):
        def new_engine(self, slots: int) -> Engine:
            return engine_class(self.model, slots, **self.engine_settings)

    api = Worker(model, spec=None, slots=slots)
    api.setup("cpu")
    return api


def work(prompt: list[int], max_new_tokens: int, **settings) -> dict:
    """What the spec sends the worker for a prompt."""
    return {"prompt": prompt, "settings": {"max_new_tokens": max_new_tokens, **settings}, "logprobs": None,
            "echo": False}  # fmt: skip


def steps(api: EngineAPI, at_most: int = 20) -> list:
    """The worker's outputs, step after step, until it holds no request."""
    outputs = []
    for _ in range(at_most):
        outputs += api.step(None)
        if not api.has_active_requests():
            break
    return outputs


def alone(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The tokens a request gets decoding alone in a fresh engine (greedy)."""
    engine = Engine(model, 1)
    engine.add(Request(prompt, max_new_tokens=max_new_tokens))
    return next(iter(engine.run().values())).tokens


def tokens_of(outputs: list, uid: str) -> list[int]:
    return [t for o in outputs if o.uid == uid and isinstance(o.output, dict) for t in o.output.get("tokens", [])]


def test_one_requests_failure_fails_that_request_only(model):
    """The worker as LitServe drives it: a request the engine refuses gets an error, the other its tokens."""
    api = worker(model, slots=2)
    api.add_request("bad", work([3, 4, 5], 4, draft_exit=99))
    api.add_request("good", work([3, 4, 5], 4))
    outputs = steps(api, at_most=10)
    bad = [o for o in outputs if o.uid == "bad"]
    assert bad[0].status == LitAPIStatus.ERROR and "draft_exit=99" in bad[0].output["error"]
    assert tokens_of(outputs, "good") == alone(model, [3, 4, 5], 4)
    assert [o for o in outputs if o.uid == "good"][-1].status == LitAPIStatus.FINISH_STREAMING
    assert not api.has_active_requests()


class FaultyEngine(Engine):
    """An engine whose step raises while a request with prompt token 13 first is in a slot: a fault inside the
    batched step, which no single request's code path can be blamed for."""

    def step(self):
        if any(row is not None and row.request.prompt[0] == 13 for row in self.slots) or any(
            request.prompt[0] == 13 for _, request in self.waiting
        ):
            raise RuntimeError("the step broke")
        return super().step()


def test_a_step_that_raises_fails_the_request_that_breaks_it_and_the_others_go_on(model):
    api = worker(model, slots=2, engine_class=FaultyEngine)
    api.add_request("good", work([3, 4, 5], 12))
    outputs = api.step(None) + api.step(None)  # "good" is some tokens in when the bad one arrives
    api.add_request("bad", work([13, 4, 5], 12))
    outputs += steps(api)
    bad = [o for o in outputs if o.uid == "bad"]
    assert [o.status for o in bad] == [LitAPIStatus.ERROR] and "the step broke" in bad[0].output["error"]
    good = [o for o in outputs if o.uid == "good"]
    assert good[-1].status == LitAPIStatus.FINISH_STREAMING and good[-2].output["finish_reason"] == "length"
    assert tokens_of(outputs, "good") == alone(model, [3, 4, 5], 12)  # resumed where it was: the same tokens


class CrowdFaultyEngine(Engine):
    """An engine whose step raises whenever two requests share it: the fault of no single request."""

    def step(self):
        if sum(row is not None for row in self.slots) + len(self.waiting) > 1:
            raise RuntimeError("two at once broke it")
        return super().step()


def test_a_step_that_fails_with_no_culprit_fails_its_requests_rather_than_retrying_for_ever(model):
    api = worker(model, slots=2, engine_class=CrowdFaultyEngine)
    for uid in ("a", "b"):
        api.add_request(uid, work([3, 4, 5], 6))
    outputs = api.step(None)
    assert sorted(o.uid for o in outputs) == ["a", "b"] and {o.status for o in outputs} == {LitAPIStatus.ERROR}
    assert all("two at once broke it" in o.output["error"] for o in outputs) and not api.has_active_requests()


def test_a_cancelled_request_frees_its_slot_for_the_next_step(model):
    """What a dropped stream does in the worker: its slot goes to the waiting request at the very next step."""
    api = worker(model, slots=1)
    for uid in ("long", "next"):
        api.add_request(uid, work([3, 4, 5], 20))
    first = api.step(None)
    assert {o.uid for o in first} == {"long"} and len(api.engine.waiting) == 1  # one slot: "next" waits
    api.cancel("long")
    second = api.step(None)
    ended = [o for o in second if o.uid == "long"]
    assert ended[0].output["finish_reason"] == "cancelled" and ended[-1].status == LitAPIStatus.FINISH_STREAMING
    assert any(o.uid == "next" and o.output["tokens"] for o in second)  # decoding in the same step
    assert not api.engine.waiting and api.has_capacity() is False  # "next" holds the slot; "long" gave it back


def test_text_is_held_back_where_a_stop_string_may_begin():
    assert hold_back("the king", ["kin"]) == ("the ", True)
    assert hold_back("the ki", ["kin"]) == ("the ", False)  # "ki" may become "kin"
    assert hold_back("the k\ufffd", []) == ("the k", False)  # half a character waits for its other half
    assert hold_back("the", ["x"]) == ("the", False)


def test_a_chat_template_beside_the_tokenizer_renders_the_messages(tmp_path):
    assert chat_template_of(tmp_path) is None
    template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert chat_template_of(tmp_path / "tokenizer.json") == template
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render_chat(template, messages) == "<system>be brief<user>hi<assistant>"
