"""Bad input through ``lego``: the message alone, once, exit status 2; settings that train nothing are refused."""

import math
import re
import subprocess
import sys

import pytest
import yaml

from lego_lightning.cli import main
from tests.conftest import REPO
from tests.helpers import CONFIGS, cli_args, quiet_trainer, subprocess_env, synthetic, tiny_ashem, tiny_lm


def lego_args(corpus, logs, *extra, config="standard.yaml", subcommand="fit"):
    return cli_args(subcommand, config, corpus, logs, "--trainer.max_epochs", "1", *extra)


def fails_cleanly(capsys, args):
    """Runs ``main(args)``; the stderr it printed, after checking the exit status and that no traceback came out."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("lego: error:") == 1
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A deep-supervision checkpoint, and files that only look like checkpoints."""
    logs = tmp_path_factory.mktemp("trained")
    main(lego_args(corpus, logs, config="deep_supervision.yaml"))
    good = logs / "deep_supervision" / "version_0" / "checkpoints" / "last.ckpt"
    blob = good.read_bytes()
    (logs / "empty.ckpt").write_bytes(b"")
    (logs / "truncated.ckpt").write_bytes(blob[: len(blob) // 2])
    (logs / "text.ckpt").write_text("hello\n")
    return logs, good


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.routing_threshold", "1.5"], r"routing_threshold must be in \[0, 1\], got 1.5"),
        (["--trainer.max_epochs", "0"], r"trainer.max_epochs=0 trains nothing"),
        (["--trainer.max_steps", "0"], r"trainer.max_steps=0 trains nothing"),
        (["--trainer.limit_train_batches", "0"], r"trainer.limit_train_batches=0 trains nothing"),
        # Exits by rule and layer dropout (standard.yaml has 3 layers and names its stages).
        (["--model.exits", "all"], r"model.stages and model.exits were both given"),
        (["--model.stages", "null", "--model.exits", "[0, 2]"], r"exits.layers=\[0, 2\] names layer 0"),
        (["--model.stages", "null", "--model.exits", "[2, 5]"], r"names layer 5, past the model's depth: allowed 1..3"),
        (["--model.stages", "null", "--model.exits", "{fractions: [1.5]}"], r"exits.fractions=\[1.5\] has 1.5"),
        (["--model.stages", "null", "--model.exits", "{every: 1, loss_weights: cubic}"], r"loss_weights='cubic'"),
        (["--model.layer_dropout", "{p_max: 1.0}"], r"layer_dropout.p_max=1.0 is not allowed: a rate in \[0, 1\)"),
        (["--model.layer_dropout", "{p_max: -0.5}"], r"layer_dropout.p_max=-0.5 is not allowed"),
        (["--model.layer_dropout", "{scale: cubic}"], r"scale.*cubic"),
        (
            [
                "--trainer.callbacks+=ExitWeightSchedule",
                "--trainer.callbacks.start=final",
                "--trainer.callbacks.end=cubic",
                "--trainer.callbacks.duration=2",
            ],
            r"ExitWeightSchedule.end='cubic' is not a rule: allowed \('final', 'uniform', 'l'",
        ),
    ],
)
def test_bad_settings_print_their_message_alone(corpus, tmp_path, capsys, extra, message):
    err = fails_cleanly(capsys, lego_args(corpus, tmp_path, *extra))
    assert re.search(message, err), err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("ckpt", "message"),
    [
        ("missing.ckpt", r"missing.ckpt' does not exist; checkpoints in .*empty.ckpt"),
        ("empty.ckpt", r"empty.ckpt' is empty \(0 bytes\)"),
        ("truncated.ckpt", r"truncated.ckpt' is truncated or corrupt"),
        ("text.ckpt", r"text.ckpt' is not a PyTorch checkpoint"),
    ],
)
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_bad_checkpoint_says_what_is_wrong_with_it(corpus, trained, tmp_path, capsys, ckpt, message, subcommand):
    logs, _ = trained
    args = lego_args(corpus, tmp_path, "--ckpt_path", str(logs / ckpt), subcommand=subcommand)
    err = fails_cleanly(capsys, args)
    assert re.search(message, err), err


def test_a_checkpoint_of_another_model_class_is_named_as_such(corpus, trained, tmp_path, capsys):
    _, good = trained
    args = lego_args(corpus, tmp_path, "--ckpt_path", str(good), config="ashem.yaml", subcommand="validate")
    err = fails_cleanly(capsys, args)
    assert "was written by SupervisedExitLM but the config builds ASHEM" in err
    assert str(good.parent.parent / "config.yaml") in err  # where the right config is


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.n_layer", "3"], "Option 'n_layer' is not accepted"),
        (["--model.d_model", "sixty"], "Parser key \"d_model\": Expected a <class 'int'>. Got value: sixty"),
        # Choice fields are Literal types: a bad choice is refused while parsing, with the choices named.
        (["--model.positions", "sideways"], "Parser key \"positions\": Expected a typing.Literal['learned', 'rotary']"),
        (["--model.head_sharing", "some"], "Parser key \"head_sharing\": Expected a typing.Literal['shared', 'sep"),
        (["--model.objective", "both"], "Parser key \"objective\": Expected a typing.Literal['causal', 'masked']"),
    ],
)
def test_an_option_that_does_not_parse_gets_one_line_not_the_usage(corpus, tmp_path, capsys, extra, message):
    err = fails_cleanly(capsys, lego_args(corpus, tmp_path, *extra))
    assert message in err
    assert "usage:" not in err and "Subtypes" not in err and "Given value" not in err
    assert len(err.strip().splitlines()) == 2  # the error, and where the options are listed


def test_a_log_folder_under_a_file_is_refused_before_anything_runs(corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    args = lego_args(corpus, tmp_path, "--trainer.logger.init_args.save_dir", str(tmp_path / "file" / "logs"))
    err = fails_cleanly(capsys, args)
    assert f"save_dir='{tmp_path / 'file' / 'logs'}' cannot be a folder: {tmp_path / 'file'} is a file" in err


def test_lego_debug_shows_the_traceback(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LEGO_DEBUG", "1")
    with pytest.raises(ValueError, match=r"routing_threshold must be in \[0, 1\]"):
        main(lego_args(corpus, tmp_path, "--model.routing_threshold", "1.5"))


def test_the_console_script_prints_one_line_and_exits_2(corpus, tmp_path):
    lego = REPO / ".venv" / "bin" / "lego" if (REPO / ".venv" / "bin" / "lego").exists() else None
    cmd = [str(lego)] if lego else [sys.executable, "-m", "lego_lightning.cli"]
    proc = subprocess.run(
        [*cmd, *lego_args(corpus, tmp_path, "--model.confidence", "maxprob")],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lego: error:")]
    assert lines == ["lego: error: confidence='maxprob' is not a known measure; allowed: "
                     "('entropy', 'learned', 'margin', 'max_prob')"]  # fmt: skip


def test_plain_ddp_for_ashem_is_reported_once_not_once_per_rank(corpus, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lego_lightning.cli",
            *lego_args(
                corpus,
                tmp_path,
                "--trainer.strategy",
                "ddp",
                "--trainer.devices",
                "2",
                "--trainer.accelerator",
                "cpu",
                "--data.calibration_samples",
                "4",
                config="ashem.yaml",
            ),
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("lego: error:") == 1
    assert "ddp_find_unused_parameters_true" in proc.stderr


def test_python_users_get_the_same_refusal_of_settings_that_train_nothing(tmp_path):
    for trainer_kwargs in ({"max_epochs": 0}, {"max_steps": 0}, {"limit_train_batches": 0}):
        trainer = quiet_trainer(tmp_path, **trainer_kwargs)
        with pytest.raises(ValueError, match=r"trains nothing"):
            trainer.fit(tiny_lm(), synthetic())
    with pytest.raises(ValueError, match=r"phase1_max_epochs must be a positive integer, got 0"):
        tiny_ashem(phase1_max_epochs=0)


def test_a_default_run_prints_no_warning_a_user_cannot_act_on(corpus, tmp_path):
    env = {**subprocess_env(), "PYTHONWARNINGS": "default"}  # as a user's terminal shows them
    phases = ["--model.phase1_max_epochs", "1", "--model.phase2_max_epochs", "1", "--data.calibration_samples", "4"]
    args = lego_args(corpus, tmp_path, *phases, "--trainer.log_every_n_steps", "1", config="ashem.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "lego_lightning.cli", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "ASHEM two-stage evaluation (phase 2" in output  # it ran to the end
    warnings = [line for line in output.splitlines() if re.search(r"\.py:\d+: ", line)]
    assert warnings == []
    assert "will override existing callbacks" not in output


@pytest.mark.parametrize("config", CONFIGS)
def test_no_config_has_epochs_shorter_than_its_logging_interval(config):
    """Lightning warns when an epoch has fewer batches than log_every_n_steps (default 50)."""
    spec = yaml.safe_load((REPO / "configs" / config).read_text())
    data = yaml.safe_load(((REPO / "configs" / config).parent / spec["data"]).read_text())["init_args"]
    batches = math.ceil(data["max_train_samples"] / data["batch_size"])
    assert batches >= spec["trainer"].get("log_every_n_steps", 50)


def test_a_run_that_trained_nothing_says_so_and_prints_no_table(corpus, tmp_path, caplog):
    caplog.set_level("INFO")
    args = lego_args(corpus, tmp_path, "--trainer.max_time", "00:00:00:00", "--data.calibration_samples", "4",
                     config="ashem.yaml")  # fmt: skip
    main(args)
    assert "Nothing was trained (0 optimizer steps)" in caplog.text
    assert "ASHEM two-stage evaluation" not in caplog.text


def test_a_run_without_checkpointing_trains_writes_none_and_says_so(corpus, tmp_path, caplog):
    caplog.set_level("INFO")
    main(lego_args(corpus, tmp_path, "--trainer.enable_checkpointing", "false", "--trainer.limit_train_batches", "2"))
    assert "checkpoints: none (trainer.enable_checkpointing is false)" in caplog.text
    assert "`Trainer.fit` stopped: `max_epochs=1` reached" in caplog.text  # it trained
    assert not list(tmp_path.rglob("*.ckpt"))
