"""`lego serve` of a converted Hugging Face checkpoint: chat through its template, and lm-eval scoring through the
server (a task over a local file: nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from lego_lightning import ExitTransformer
from lego_lightning.generation import tokenizer_of
from tests.test_pretrained_cli import llama_family, save_with_tokenizer
from tests.test_serve import KEY, client, lego_serve

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def llama(corpus, tmp_path_factory) -> Path:
    """A tiny random Llama saved by transformers, its BPE, and a tokenizer config with a chat template."""
    torch.manual_seed(0)
    folder = save_with_tokenizer(
        llama_family(transformers.LlamaForCausalLM, transformers.LlamaConfig, 4),
        tmp_path_factory.mktemp("llama"),
        corpus,
    )
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server(llama):
    with lego_serve("--model.pretrained", str(llama), "--model.exits", "[2, 4]", "--draft_exit", "2",
                    "--max_new_tokens", "8") as (_, url):  # fmt: skip
        yield url


def test_chat_reads_the_messages_through_the_tokenizers_chat_template(server, llama):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the river"}]
    api = client(server)
    chat = api.chat.completions.create(model="any", messages=messages, max_tokens=8)
    rendered = "<|system|>be brief\n<|user|>the river\n<|assistant|>"
    completion = api.completions.create(model="any", prompt=rendered, max_tokens=8)
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 8
    streamed = api.chat.completions.create(model="any", messages=messages, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == completion.choices[0].text


def test_lm_eval_scores_a_local_task_through_the_server_as_the_model_itself(server, llama, tmp_path):
    import lm_eval  # the eval extra, installed by make test
    from lm_eval.tasks import TaskManager

    docs = [{"context": "the river", "continuation": " was built"}, {"context": "in 1990 the", "continuation": " king"}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "local_task.yaml").write_text(
        "task: lego_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_target: '{{continuation}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{server}/v1/completions",
            "model": "lego",
            "tokenizer": str(llama),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "num_concurrent": 1,
            "max_retries": 1,
            "header": {"Authorization": f"Bearer {KEY}"},
        },
        tasks=["lego_local"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    scored = {s["doc"]["context"]: s["resps"][0][0][0] for s in results["samples"]["lego_local"]}
    # The same sums from the model itself: the continuation's tokens given the context, at the last exit.
    model = ExitTransformer.from_pretrained(llama, exits=[2, 4]).eval()
    tokenizer = tokenizer_of(llama)
    for doc in docs:
        context, whole = (
            tokenizer.encode_prompt(doc["context"]),
            tokenizer.encode_prompt(doc["context"] + doc["continuation"]),
        )
        ids = torch.tensor([whole])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids, exit_layers=[4])[4][0, :-1], dim=-1)
        own = sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole)))
        assert scored[doc["context"]] == pytest.approx(own, rel=1e-4, abs=1e-4)
