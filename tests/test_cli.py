"""Every config in configs/ runs through the real `lego` CLI on a tiny corpus."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lego_lightning.cli import LegoCLI, main
from lego_lightning.model.exits import as_exit_rule
from tests.conftest import REPO
from tests.helpers import CONFIGS, cli_args


def run(subcommand: str, config: str, corpus: Path, logs: Path, *extra: str) -> LegoCLI:
    fit = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2"] if subcommand == "fit" else []
    return LegoCLI(args=cli_args(subcommand, config, corpus, logs, *fit, *extra))


def test_configs_are_all_here():
    names = {c.removesuffix(".yaml") for c in CONFIGS}
    assert {"bpe/standard", "bpe/deep_supervision", "bpe/early_exit", "bpe/ashem"} <= names
    methods = {
        "standard",
        "deep_supervision",
        "aux_loss",
        "asymmetric_aux_0.7",
        "asymmetric_aux_0.8",
        "deed",
        "early_exit",
        "discriminative_lr_decreasing",
        "discriminative_lr_increasing",
        "dynamic_alpha",
    }
    assert methods | {f"char_{m}" for m in methods} <= names


def expected_exits(model_spec: dict) -> tuple[int, ...]:
    args = model_spec["init_args"]
    if model_spec["class_path"] == "lego_lightning.SupervisedExitLM":
        if "exits" in args:  # placed by rule: tests/model/test_exits.py checks the rules themselves
            return as_exit_rule(args["exits"]).exit_layers(args["n_layers"])
        return tuple(s["layers"][1] for s in args["stages"])
    if model_spec["class_path"] == "lego_lightning.PhasedExitLM":
        depths = [p["layers"] for p in args["phases"] if p.get("layers")]
        phase1 = args.get("stages") or [{"layers": [1, depths[0]]}]
        return (*(s["layers"][1] for s in phase1), *sorted(set(depths[1:]) - {depths[0]}))
    phase1 = args.get("stages") or [{"layers": [1, args["phase1_layers"]]}]
    return (*(s["layers"][1] for s in phase1), args["phase2_layers"])


def one_epoch_phases(model_spec: dict) -> list[str]:
    """Command-line overrides that end every phase after one epoch."""
    args = model_spec["init_args"]
    if "phases" in args:
        return ["--model.phases", json.dumps([{**p, "max_epochs": 1} for p in args["phases"]])]
    return ["--model.phase1_max_epochs", "1", "--model.phase2_max_epochs", "1"]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_trains_and_validates_through_the_cli(config, corpus, tmp_path):
    spec = yaml.safe_load((REPO / "configs" / config).read_text())
    model_spec = spec["model"]
    phased = model_spec["class_path"] != "lego_lightning.SupervisedExitLM"
    extra = one_epoch_phases(model_spec) if phased else []
    data_spec = yaml.safe_load(((REPO / "configs" / config).parent / spec["data"]).read_text())
    if model_spec["init_args"].get("warmup_steps"):
        extra += ["--model.warmup_steps", "1"]  # the tiny run has 4 steps
    if data_spec["init_args"].get("calibration_samples"):
        extra += ["--data.calibration_samples", "4"]  # the tiny corpus has a few dozen blocks
    cli = run("fit", config, corpus, tmp_path, *extra)
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == 4
    assert model.data_vocab_size == cli.datamodule.vocab_size  # linked, never typed
    assert model.config.exit_layers == expected_exits(model_spec)
    validated = model.config.exit_layers  # the exits of the last validation
    if phased:
        # One epoch per phase, two epochs: the second validation (in phase 2) ends phase 2 too.
        assert model.phase == min(3, model.num_phases)
        validated = model.plan[1].exits
    metrics = trainer.callback_metrics
    for k in validated:
        assert torch.isfinite(metrics[f"val/exit{k}/ppl"])
        # Bits per byte beside perplexity, but for the masked objective (it scores a sample of tokens).
        assert (f"val/exit{k}/bpb" in metrics) == (model.objective == "causal")
    # The tokenizer the model was trained with, beside the logs.
    saved = Path(trainer.log_dir) / ("vocab.json" if data_spec["init_args"].get("level") else "tokenizer.json")
    assert saved.is_file()
    routed = model_spec["init_args"].get("routing_threshold") is not None or model_spec["class_path"].endswith("ASHEM")
    assert ("val/routed/ppl" in metrics) == routed
    assert metrics["val/ppl"] == metrics["val/routed/ppl" if routed else f"val/exit{validated[-1]}/ppl"]
    assert Path(trainer.checkpoint_callback.best_model_path).is_file()
    assert torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)["global_step"] == 4


def test_tensorboard_gets_the_design_log_names(corpus, tmp_path):
    cli = run("fit", "deed.yaml", corpus, tmp_path)
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/exit1/loss",
        "train/exit3/loss",
        "val/ppl",
        "val/exit1/ppl",
        "val/exit2/acc",
        "val/routed/ppl",
        "val/routed/acc",
        "val/routed/exit1_frac",
        "val/routed/flops_ratio",
        "val/routed/layers_ratio",
        "lr-AdamW/layers1-1",
    }
    assert expected <= tags, expected - tags
    assert len(events.Scalars("val/ppl")) == 2  # one point per epoch


def test_validate_rebuilds_from_a_checkpoint_and_the_command_line_wins(corpus, tmp_path):
    fit = run("fit", "deed.yaml", corpus, tmp_path)
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    everyone_leaves_early = run(
        "validate", "deed.yaml", corpus, tmp_path, "--ckpt_path", ckpt, "--model.routing_threshold", "0.0"
    )
    metrics = everyone_leaves_early.trainer.callback_metrics
    assert metrics["val/routed/exit1_frac"] == 1.0
    assert metrics["val/routed/ppl"] == pytest.approx(metrics["val/exit1/ppl"].item())
    # With no model config at all, the checkpoint's hyperparameters rebuild the model.
    from_ckpt_only = LegoCLI(
        args=[
            "validate",
            "--data",
            str(REPO / "configs/data/wikitext2_word.yaml"),
            "--data.path",
            str(corpus),
            "--ckpt_path",
            ckpt,
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.limit_val_batches",
            "2",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert from_ckpt_only.model.config.exit_layers == (1, 2, 3)
    assert from_ckpt_only.model.routing_threshold == 0.5


def test_a_config_that_does_not_fit_the_checkpoint_fails_with_the_field_named(corpus, tmp_path):
    ckpt = run("fit", "standard.yaml", corpus, tmp_path).trainer.checkpoint_callback.last_model_path
    with pytest.raises(ValueError, match=r"the checkpoint has d_model=64 but this model has d_model=32"):
        run("validate", "standard.yaml", corpus, tmp_path, "--ckpt_path", ckpt, "--model.d_model", "32")
    with pytest.raises(ValueError, match=r"the checkpoint has n_layers=3 but this model has n_layers=4"):
        run(
            "validate",
            "standard.yaml",
            corpus,
            tmp_path,
            "--ckpt_path",
            ckpt,
            "--model.n_layers",
            "4",
            "--model.stages",
            "[{layers: [1, 4]}]",
        )


def test_checkpoint_vocabulary_must_match_the_data(corpus, tmp_path):
    ckpt = run("fit", "standard.yaml", corpus, tmp_path).trainer.checkpoint_callback.last_model_path
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train.txt", "valid.txt"):
        (other / name).write_text((corpus / name).read_text() + " zebra quagga\n")
    with pytest.raises(ValueError, match=r"vocab_size="):
        run("validate", "standard.yaml", other, tmp_path, "--ckpt_path", ckpt)


def test_fit_without_a_logger(corpus, tmp_path):
    cli = run(
        "fit",
        "standard.yaml",
        corpus,
        tmp_path,
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert cli.trainer.global_step == 4 and not cli.trainer.loggers
    assert Path(cli.trainer.checkpoint_callback.last_model_path).is_file()


def test_stages_and_threshold_from_the_command_line(corpus, tmp_path):
    cli = run(
        "fit",
        "standard.yaml",
        corpus,
        tmp_path,
        "--model.stages",
        "[{layers: [1, 1], loss_weight: 0.3}, {layers: [2, 3], loss_weight: 0.7}]",
        "--model.routing_threshold",
        "0.2",
    )
    assert cli.model.config.exit_layers == (1, 3)
    assert cli.model.exit_loss_weights == [0.3, 0.7]
    assert "val/routed/ppl" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.stages", "[{layers: [1, 1]}, {layers: [3, 3]}]"], r"leaves a gap"),
        (["--model.routing_threshold", "1.5"], r"routing_threshold must be in \[0, 1\], got 1.5"),
        (["--model.confidence", "maxprob"], r"confidence='maxprob' is not a known measure"),
        (
            ["--data.seq_len", "64"],
            r"data.seq_len=64 is larger than the model's context model.max_seq_len=32",
        ),
    ],
)
def test_bad_input_fails_before_training(corpus, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        run("fit", "standard.yaml", corpus, tmp_path, *extra)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ("[{layers: 3}, {layers: 4, patience: -1}]", r"model.init_args.phases\[1\].patience=-1 is not allowed"),
        ("[{layers: 3}, {layers: 2}]", r"phases\[1\].layers=2 is smaller than the previous phase's 3"),
        ("[{layers: 3}, {layers: 4, train: [layers 5-6]}]", r"phases\[1\].train: 'layers 5-6' names layers 5-6"),
        ("[{layers: 3}, {layers: 4, tokens: hard, hard_ratio: 1.5}]", r"phases\[1\].hard_ratio=1.5 is not allowed"),
        ("[{layers: 3}, {layers: 4, tokens: hard, hard_exit: 1}]", r"phases\[1\].hard_exit=1 is not an exit"),
        ("[]", r"phases must hold at least one phase, got an empty list"),
    ],
)
def test_a_bad_phase_plan_fails_before_training_with_the_phase_named(corpus, tmp_path, capsys, phases, message):
    args = cli_args("fit", "progressive_unfreeze.yaml", corpus, tmp_path, "--model.phases", phases)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_plans_checkpoint_validates_through_the_cli_with_its_own_plan(corpus, tmp_path):
    plan = "[{layers: 3, max_epochs: 1}, {layers: 4, train: [new], loss_weights: {3: 0.5, 4: 0.5}, max_epochs: 1}]"
    fit = run("fit", "progressive_unfreeze.yaml", corpus, tmp_path, "--model.phases", plan)
    assert fit.model.num_phases == 2 and fit.model.phase_loss_weights(2) == [0.5, 0.5]
    last = fit.trainer.checkpoint_callback.last_model_path
    # As everywhere in the CLI, the config and command line win over the checkpoint's settings: the same plan.
    checked = run(
        "validate", "progressive_unfreeze.yaml", corpus, tmp_path, "--ckpt_path", last, "--model.phases", plan
    )
    assert checked.model.num_phases == 2 and checked.model.phase == 2
    assert {"val/exit3/ppl", "val/exit4/ppl"} <= set(checked.trainer.callback_metrics)


def test_missing_data_path_fails_with_the_path_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/standard.yaml"), "--data.path", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"TextDataModule.path='.*nowhere' does not exist", err)
    assert "point --data.path at a folder with train and valid files, or give --data.path null" in err


def test_ashem_validate_rebuilds_the_model_of_either_phase(corpus, tmp_path):
    fit = run(
        "fit",
        "ashem.yaml",
        corpus,
        tmp_path,
        "--model.phase1_max_epochs",
        "2",
        "--model.phase2_max_epochs",
        "1",
        "--data.calibration_samples",
        "4",
        "--checkpoint.save_top_k",
        "-1",
        "--checkpoint.filename",
        "{epoch}",
        "--trainer.max_epochs",
        "3",
    )
    folder = Path(fit.trainer.checkpoint_callback.dirpath)
    phase1, phase2 = str(folder / "epoch=0.ckpt"), str(folder / "epoch=2.ckpt")
    assert torch.load(phase1, weights_only=True)["phase"]["phase"] == 1
    first = run("validate", "ashem.yaml", corpus, tmp_path, "--ckpt_path", phase1, "--data.calibration_samples", "4")
    assert first.model.phase == 1 and first.model.routing_threshold is None
    assert "val/exit2/ppl" in first.trainer.callback_metrics and "val/exit4/ppl" not in first.trainer.callback_metrics
    second = run("validate", "ashem.yaml", corpus, tmp_path, "--ckpt_path", phase2, "--data.calibration_samples", "4")
    assert second.model.phase == 2 and second.model.routing_threshold == fit.model.routing_threshold
    metrics = second.trainer.callback_metrics
    assert {"val/exit2/ppl", "val/exit4/ppl", "val/routed/ppl", "val/routed/flops_ratio"} <= set(metrics)
    assert metrics["val/exit4/ppl"] == pytest.approx(float(fit.trainer.callback_metrics["val/exit4/ppl"]), rel=1e-5)
