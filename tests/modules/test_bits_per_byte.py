"""Bits per byte: the summed NLL in bits over the UTF-8 bytes of the text the scored tokens cover."""

import math

import pytest
import torch
import torch.nn.functional as F

from lego_lightning import SupervisedExitLM
from lego_lightning.data import TextDataModule
from lego_lightning.evaluation import collect_exit_outputs, routed_metrics
from tests.conftest import write_corpus
from tests.helpers import quiet_trainer, synthetic, tiny_lm


def validate(module, data, tmp_path):
    (metrics,) = quiet_trainer(tmp_path).validate(module, data, verbose=False)
    return metrics


def test_at_the_byte_level_bits_per_byte_is_the_loss_in_bits(tmp_path):
    # One token per byte, so the bytes the targets cover are the number of targets.
    data = TextDataModule(path=str(write_corpus(tmp_path / "c")), tokenizer="byte", seq_len=16, cache_dir=str(tmp_path))
    module = tiny_lm(vocab_size=data.vocab_size, stages=[{"layers": [1, 1]}, {"layers": [2, 3]}], routing_threshold=0.5)
    m = validate(module, data, tmp_path)
    for key in ("exit1", "exit3", "routed"):
        assert m[f"val/{key}/bpb"] == pytest.approx(m[f"val/{key}/loss"] / math.log(2), rel=1e-5)


def test_word_level_bits_per_byte_divides_by_the_bytes_of_the_covered_text(tmp_path):
    folder = write_corpus(tmp_path / "c")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    text = "".join(f" {words[i % 8]}  {words[(3 * i) % 8]} {words[(5 * i) % 8]}\n" for i in range(8))
    (folder / "valid.txt").write_text(text, encoding="utf-8")  # 8 lines of 3 words and <eos>: 32 tokens
    data = TextDataModule(path=str(folder), seq_len=31, cache_dir=str(tmp_path))
    data.setup("validate")
    assert len(data.splits["validation"]) == 1  # targets: every token but the first word
    module = tiny_lm(vocab_size=data.vocab_size)
    m = validate(module, data, tmp_path)
    block = data.splits["validation"][0]
    with torch.no_grad():
        logits = module.model(block["input_ids"][None])[3][0]  # the one exit, after layer 3
    nll_bits = F.cross_entropy(logits.float(), block["targets"], reduction="sum").item() / math.log(2)
    covered = len(text.encode("utf-8")) - len(text.split()[0])  # all of the text but the first word
    assert m["val/exit3/bpb"] == pytest.approx(nll_bits / covered, rel=1e-5)


def test_data_without_the_bytes_of_its_text_logs_no_bits_per_byte(tmp_path):
    m = validate(tiny_lm(), synthetic(), tmp_path)
    assert "val/exit3/ppl" in m and not any(k.endswith("/bpb") for k in m)


def test_the_masked_objective_logs_no_bits_per_byte(tmp_path):
    data = TextDataModule(path=str(write_corpus(tmp_path / "c")), seq_len=16, cache_dir=str(tmp_path))
    module = SupervisedExitLM(vocab_size=data.vocab_size, n_layers=2, d_model=16, n_heads=2, objective="masked")
    m = validate(module, data, tmp_path)
    assert "val/exit2/ppl" in m and not any(k.endswith("/bpb") for k in m)


def test_offline_bits_per_byte_match_the_modules_own_at_each_exit_and_routed(tmp_path):
    data = TextDataModule(path=str(write_corpus(tmp_path / "c")), tokenizer="byte", seq_len=16, cache_dir=str(tmp_path))
    data.setup("validate")
    module = tiny_lm(vocab_size=data.vocab_size, stages=[{"layers": [1, 1]}, {"layers": [2, 3]}])
    outputs = collect_exit_outputs(module, data.val_dataloader())
    threshold = outputs.confidence[0].median().item()
    module.routing_threshold = threshold
    m = validate(module, data, tmp_path)
    assert outputs.exit_bpb(1) == pytest.approx(m["val/exit1/bpb"], rel=1e-5)
    assert outputs.exit_bpb(3) == pytest.approx(m["val/exit3/bpb"], rel=1e-5)
    assert routed_metrics(outputs, threshold, module.config)["bpb"] == pytest.approx(m["val/routed/bpb"], rel=1e-5)


def test_offline_outputs_without_the_bytes_of_their_text_have_no_bits_per_byte(tmp_path):
    module, data = tiny_lm(), synthetic()
    outputs = collect_exit_outputs(module, data.val_dataloader())
    assert outputs.target_bytes is None and outputs.exit_bpb(3) is None
    assert routed_metrics(outputs, 0.5, module.config)["bpb"] is None
