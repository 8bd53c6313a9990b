"""`lego generate`: text from `make demo`'s kind of checkpoint and from a converted Llama, by Lightning's predict."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from lego_lightning import ASHEM, ExitTransformer
from lego_lightning.cli import main
from lego_lightning.decoding import generate
from lego_lightning.generation import tokenizer_of
from tests.conftest import REPO
from tests.helpers import subprocess_env
from tests.test_pretrained_cli import llama_family, save_with_tokenizer

PROMPTS = ["the game began in", "in 1990 the", "a"]


def lego_generate(*args: str) -> list[dict]:
    """``lego generate ... --output`` and the JSON lines it wrote."""
    out = Path(args[args.index("--output") + 1])
    main(["generate", "--trainer.enable_progress_bar", "false", *args])
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generate_from_a_demo_checkpoint_gives_full_depths_text_with_self_speculation(demo_checkpoint, tmp_path):
    common = ["--ckpt_path", str(demo_checkpoint), *[a for p in PROMPTS for a in ("--prompt", p)],
              "--max_new_tokens", "10"]  # fmt: skip
    full = lego_generate(*common, "--output", str(tmp_path / "full.jsonl"))
    exits = torch.load(demo_checkpoint, weights_only=True)["model_config"]["exit_layers"]
    drafted = lego_generate(*common, "--draft_exit", str(exits[0]), "--num_speculations", "3", "--batch_size", "2",
                            "--output", str(tmp_path / "drafted.jsonl"))  # fmt: skip
    assert [r["prompt"] for r in full] == PROMPTS
    assert [r["text"] for r in drafted] == [r["text"] for r in full]
    assert all(r["tokens"] == 10 and r["text"].startswith(" ") for r in full)  # words after the prompt's last
    assert all(r["drafts"] >= r["accepted"] >= 0 and r["tokens_per_s"] > 0 for r in drafted)
    assert sum(r["drafts"] for r in drafted) > 0 and "drafts" not in full[0]
    assert not (Path.cwd() / "config.yaml").exists()  # generating keeps no run config in the working folder
    # The text is the module's own full-depth tokens, decoded in the checkpoint's tokenizer.
    module = ASHEM.load_from_checkpoint(demo_checkpoint, map_location="cpu").eval()
    tokenizer = tokenizer_of(demo_checkpoint)
    ids = torch.tensor([tokenizer.encode_prompt(PROMPTS[0])])
    tokens = generate(module.model, ids, 10).tokens[0, ids.shape[1] :].tolist()
    assert full[0]["text"] == tokenizer.decode(ids[0].tolist() + tokens)[len(tokenizer.decode(ids[0].tolist())) :]


def test_draft_exit_auto_writes_full_depths_text(demo_checkpoint, tmp_path):
    common = ["--ckpt_path", str(demo_checkpoint), *[a for p in PROMPTS for a in ("--prompt", p)],
              "--max_new_tokens", "12", "--batch_size", "2"]  # fmt: skip
    full = lego_generate(*common, "--output", str(tmp_path / "full.jsonl"))
    auto = lego_generate(*common, "--draft_exit", "auto", "--num_speculations", "auto", "--max_speculations", "3",
                         "--output", str(tmp_path / "auto.jsonl"))  # fmt: skip
    assert [r["text"] for r in auto] == [r["text"] for r in full]
    assert all(r["drafts"] >= r["accepted"] >= 0 for r in auto)  # reported as for a fixed exit


def test_prompts_from_a_file_of_lines_or_json_lines_and_sampling_reproducible_by_seed(demo_checkpoint, tmp_path):
    lines, jsonl = tmp_path / "prompts.txt", tmp_path / "prompts.jsonl"
    lines.write_text("\n".join(PROMPTS) + "\n\n")
    jsonl.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(PROMPTS)))
    sample = ["--temperature", "1.0", "--top_k", "20", "--seed", "3", "--max_new_tokens", "6"]
    a = lego_generate("--ckpt_path", str(demo_checkpoint), "--prompts", str(lines), *sample, "--output",
                      str(tmp_path / "a.jsonl"))  # fmt: skip
    b = lego_generate("--ckpt_path", str(demo_checkpoint), "--prompts", str(jsonl), *sample, "--batch_size", "3",
                      "--output", str(tmp_path / "b.jsonl"))  # fmt: skip
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b] == PROMPTS
    assert [r["text"] for r in a] == [r["text"] for r in b]  # a prompt samples alike alone or in a batch


def test_a_converted_llama_generates_transformers_greedy_text(corpus, tmp_path, capsys):
    torch.manual_seed(0)
    llama = llama_family(transformers.LlamaForCausalLM, transformers.LlamaConfig, 4)
    folder = save_with_tokenizer(llama, tmp_path, corpus)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    hf.generation_config.eos_token_id = None
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = "the cat sat on"
    main(["generate", "--model.pretrained", str(folder), "--model.exits", "[2, 4]", "--prompt", prompt,
          "--max_new_tokens", "8", "--draft_exit", "2", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    printed = capsys.readouterr().out
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert prompt + tokenizer.decode(expected[0, ids.shape[1] :].tolist()) in printed
    ours = ExitTransformer.from_pretrained(folder, exits=[2, 4]).eval()
    assert torch.equal(generate(ours, ids, 8, draft_exit=2).tokens, expected)


def bare_checkpoint(demo_checkpoint: Path, tmp_path: Path) -> Path:
    """The demo checkpoint without its data module's state: no tokenizer in it."""
    saved = torch.load(demo_checkpoint, weights_only=True)
    for key in [k for k, v in saved.items() if isinstance(v, dict) and set(v) <= {"vocab", "tokenizer"} and v]:
        del saved[key]
    path = tmp_path / "bare.ckpt"
    torch.save(saved, path)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--draft_exit", "4"], r"draft_exit=4 is not an exit before the last: .* allowed \(2,\)"),
        (["--draft_exit", "2", "--num_speculations", "0"], r"num_speculations=0: allowed a positive integer"),
        (["--max_new_tokens", "40"], r"prompt 1 has 4 tokens; with max_new_tokens=40 .* max_seq_len=32"),
        (["--threshold", "0.5", "--draft_exit", "2"], r"routing and self-speculative decoding are two ways"),
        (["--temperature", "-1"], r"temperature must be >= 0"),
        (["--num_speculations", "auto"], r"num_speculations='auto' chooses how many tokens .* needs a draft_exit"),
        (["--draft_exit", "auto", "--num_speculations", "auto", "--max_speculations", "0"],
         r"max_speculations=0: num_speculations='auto' chooses K up to it"),
        (["--draft_exit", "best"], r"draft_exit"),
    ],
)  # fmt: skip
def test_bad_generation_input_ends_with_one_line_before_any_work(demo_checkpoint, tmp_path, capsys, extra, message):
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as ended:
        main(["generate", "--ckpt_path", str(demo_checkpoint), "--prompt", PROMPTS[0], *extra, "--output", str(out)])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("lego: error:")]) == 1
    assert re.search(message, err), err
    assert not out.exists() and "Predicting" not in err


def test_a_checkpoint_without_a_tokenizer_and_an_empty_prompt_file_are_named(demo_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (["--ckpt_path", str(bare_checkpoint(demo_checkpoint, tmp_path)), "--prompt", "a"], "holds no tokenizer"),
        (["--ckpt_path", str(demo_checkpoint), "--prompts", str(empty)], "is empty: give one prompt per line"),
        (["--ckpt_path", str(demo_checkpoint)], "no prompt: give --prompt TEXT"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as ended:
            main(["generate", *args])
        assert ended.value.code == 2
        assert message in capsys.readouterr().err


def test_prompts_spread_over_two_processes_come_back_whole_and_in_order(demo_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 2))  # 6 prompts in batches of 2: 3 batches over 2 ranks
    single = lego_generate("--ckpt_path", str(demo_checkpoint), "--prompts", str(prompts), "--batch_size", "2",
                           "--max_new_tokens", "5", "--output", str(tmp_path / "one.jsonl"))  # fmt: skip
    out = tmp_path / "two.jsonl"
    cmd = [sys.executable, "-m", "lego_lightning.cli", "generate", "--ckpt_path", str(demo_checkpoint), "--prompts",
           str(prompts), "--batch_size", "2", "--max_new_tokens", "5", "--output", str(out),
           "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.enable_progress_bar", "false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["text"]) for r in two] == [(r["prompt"], r["text"]) for r in single]


def test_json_lines_carry_their_own_settings_over_the_command_lines(demo_checkpoint, tmp_path, capsys):
    lines = [
        {"text": PROMPTS[0], "max_new_tokens": 3},
        {"text": PROMPTS[1], "temperature": 1.0, "top_k": 20, "seed": 7, "max_new_tokens": 6},
        {"text": PROMPTS[2], "id": "mine"},  # fields that are not settings are the caller's own
        {"text": PROMPTS[0], "temperature": 0.9, "top_p": 0.9, "max_new_tokens": 5},  # --seed + its index: 1 + 3
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    # The command line's max_new_tokens (29) overflows the context (32) for these prompts; lines 1, 2 and 4 set
    # their own, and line 3 is short enough.
    rows = lego_generate("--ckpt_path", str(demo_checkpoint), "--prompts", str(prompts), "--max_new_tokens", "29",
                         "--batch_size", "2", "--seed", "1", "--output", str(tmp_path / "out.jsonl"))  # fmt: skip
    assert [r["tokens"] for r in rows] == [3, 6, 29, 5]
    module = ASHEM.load_from_checkpoint(demo_checkpoint, map_location="cpu").eval()
    tokenizer = tokenizer_of(demo_checkpoint)
    expected_settings = [
        {"max_new_tokens": 3},
        {"max_new_tokens": 6, "temperature": 1.0, "top_k": 20, "seed": 7},
        {"max_new_tokens": 29},
        {"max_new_tokens": 5, "temperature": 0.9, "top_p": 0.9, "seed": 4},
    ]
    for row, line, settings in zip(rows, lines, expected_settings):
        ids = torch.tensor([tokenizer.encode_prompt(line["text"])])
        new = settings.pop("max_new_tokens")
        tokens = generate(module.model, ids, new, **settings).tokens[0, ids.shape[1] :].tolist()
        assert row["text"] == tokenizer.decode(ids[0].tolist() + tokens)[len(tokenizer.decode(ids[0].tolist())) :]
    # The context check reads each line's own max_new_tokens, and a line's bad setting is named before any work.
    for bad, message in (
        ({"text": PROMPTS[0], "max_new_tokens": 30}, r"prompt 2 has 4 tokens; with max_new_tokens=30"),
        ({"text": PROMPTS[0], "temperature": -1}, r"prompt 2: temperature must be >= 0"),
        ({"text": PROMPTS[0], "top_p": 2}, r"prompt 2: top_p must be in \(0, 1\]"),
    ):
        prompts.write_text(json.dumps(lines[0]) + "\n" + json.dumps(bad))
        with pytest.raises(SystemExit):
            main(["generate", "--ckpt_path", str(demo_checkpoint), "--prompts", str(prompts), "--max_new_tokens", "4"])
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert "Predicting" not in err


def test_a_prompt_with_an_emoji_is_read_and_no_seed_is_announced(demo_checkpoint, tmp_path, capfd):
    rows = lego_generate("--ckpt_path", str(demo_checkpoint), "--prompt", "the game 🙂", "--prompt", "a",
                         "--max_new_tokens", "3", "--output", str(tmp_path / "out.jsonl"))  # fmt: skip
    assert [r["prompt"] for r in rows] == ["the game 🙂", "a"] and all(r["tokens"] == 3 for r in rows)
    printed = capfd.readouterr()
    assert "seed" not in (printed.out + printed.err).lower()  # neither "No seed found" nor "Seed set to 0"
