"""A 4-phase plan run by PhasedExitLM: growth, unfreezing, per-part rates, hard tokens, resume, checkpoints."""

import logging
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.testing import assert_close

from lego_lightning import Phase, PhasedExitLM
from lego_lightning.callbacks import BestAndLastCheckpoint, PerplexityEarlyStopping
from tests.helpers import quiet_trainer, synthetic

# 2 layers; grow to 3 (identity); grow to 4 (copy) trained on the tokens exit 3 is unsure of;
# then unfreeze layer 2 at a tenth of the new layers' rate. One epoch per phase after the first.
FOUR_PHASES = [
    Phase(layers=2, max_epochs=2, patience=5),
    Phase(layers=3, grow_init="identity", max_epochs=1, lr_scale=0.5),
    Phase(layers=4, grow_init="copy", tokens="hard", hard_ratio=0.5, max_epochs=1),
    Phase(train=["layers 3-4", "exit 4", "layer 2"], lr_scale={"layer 2": 0.1}, max_epochs=1),
]
LR = 3e-3


def four_phase_model(**kwargs):
    defaults = dict(vocab_size=64, d_model=32, n_heads=2, max_seq_len=16, lr=LR, head_sharing="separate")
    return PhasedExitLM(phases=FOUR_PHASES, **{**defaults, **kwargs})


class PhaseRecorder(Callback):
    """At the first training batch of each phase: what requires a gradient and each group's learning rate."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.phase not in self.seen:
            self.seen[pl_module.phase] = {
                "trainable": {n for n, p in pl_module.named_parameters() if p.requires_grad},
                "lrs": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups},
                "weights": list(pl_module.exit_loss_weights),
            }


def parts(names):
    """Parameter names as the parts they belong to: ``tok_emb``, ``blocks.2``, ``heads.1``..."""
    return {".".join(n.split(".")[1:3]) if n.split(".")[1] in ("blocks", "heads") else n.split(".")[1] for n in names}


def test_four_phases_grow_freeze_unfreeze_and_set_each_parts_rate(tmp_path):
    torch.manual_seed(0)
    module, recorder = four_phase_model(), PhaseRecorder()
    assert module.config.exit_layers == (2, 3, 4) and module.config.n_layers == 4
    trainer = quiet_trainer(tmp_path, max_epochs=-1, callbacks=[recorder])
    trainer.fit(module, synthetic())
    assert module.phase == 4 and trainer.current_epoch == 5  # 2 + 1 + 1 + 1 epochs, then the plan ends the run
    seen = recorder.seen
    # Phase 1: the embedding, layers 1-2 and exit 2; phase 2: the new layer 3 and its exit; phase 3: layer 4
    # and exit 4 (on hard tokens); phase 4: layers 3-4 and exit 4 again, and layer 2 unfrozen.
    assert parts(seen[1]["trainable"]) == {"tok_emb", "pos_emb", "blocks.0", "blocks.1", "heads.0"}
    assert parts(seen[2]["trainable"]) == {"blocks.2", "heads.1"}
    assert parts(seen[3]["trainable"]) == {"blocks.3", "heads.2"}
    assert parts(seen[4]["trainable"]) == {"blocks.1", "blocks.2", "blocks.3", "heads.2"}
    # Learning rates: phase 1 the base; phase 2 half of it; phase 3 the base; phase 4 the base for the new
    # layers and a tenth of it for layer 2, which sits in its own group.
    assert set(seen[1]["lrs"].values()) == {LR}
    assert seen[2]["lrs"]["layers3-3"] == pytest.approx(LR * 0.5)
    assert seen[3]["lrs"]["layers4-4"] == pytest.approx(LR)
    layer2 = [name for name in seen[4]["lrs"] if name.startswith("layers1-2") and seen[4]["lrs"][name] < LR]
    assert layer2 and all(seen[4]["lrs"][n] == pytest.approx(LR * 0.1) for n in layer2)
    assert seen[4]["lrs"]["layers4-4"] == pytest.approx(LR)
    # Loss weights: the deepest exit of each phase.
    assert [seen[p]["weights"] for p in (1, 2, 3, 4)] == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]
    # Phase 3 mined hard tokens at exit 3 and phase 4 trains on all tokens again.
    assert module.hard_mask is None and module.routing_threshold is not None
    assert {"val/exit2/ppl", "val/exit3/ppl", "val/exit4/ppl", "phases/phase"} <= set(trainer.callback_metrics)


def test_phase_changes_print_why_and_what_and_resume_says_where(tmp_path, caplog):
    torch.manual_seed(0)
    ckpt = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/ppl", save_last=True)
    with caplog.at_level(logging.INFO):
        quiet_trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[ckpt]).fit(
            four_phase_model(), synthetic()
        )
    text = caplog.text
    assert "Phase 1/4 ended: it reached its 2 epochs; best val/ppl" in text
    assert "Phase 2/4: 3 layers, layers 3-3 new (identity), exits [2, 3]" in text
    assert "trains: layer 3, exit 3; frozen: embedding, layer 1, layer 2, exit 2" in text
    assert "learning rates: 0.0015" in text
    assert "hard tokens: threshold" in text and "at exit 3 (hard_ratio 0.5)" in text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        quiet_trainer(tmp_path, max_epochs=-1, enable_checkpointing=True, callbacks=[ckpt]).fit(
            four_phase_model(), synthetic(), ckpt_path=ckpt.last_model_path
        )
    assert "Resumed in phase 3/4 (epoch 3, 4 layers, routing threshold" in caplog.text


def test_the_progress_bar_says_the_phase(tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar

    descriptions = []

    class Bar(TQDMProgressBar):
        def on_train_batch_end(self, trainer, *args, **kwargs):
            super().on_train_batch_end(trainer, *args, **kwargs)
            descriptions.append(self.train_progress_bar.desc)

    trainer = quiet_trainer(tmp_path, max_epochs=4, enable_progress_bar=True, callbacks=[Bar()])
    trainer.fit(four_phase_model(), synthetic())
    assert descriptions[0].startswith("Epoch 0 · phase 1/4") and descriptions[-1].startswith("Epoch 3 · phase 3/4")


def fit_to(tmp_path, max_epochs, ckpt_path=None):
    torch.manual_seed(0)
    module = four_phase_model(dropout=0.1)
    ckpt = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/ppl", save_last=True)
    trainer = quiet_trainer(
        tmp_path, max_epochs=max_epochs, enable_checkpointing=True, callbacks=[ckpt], deterministic=True
    )
    trainer.fit(module, synthetic(), ckpt_path=ckpt_path)
    return module, trainer, ckpt


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return fit_to(tmp_path_factory.mktemp("full"), -1)


@pytest.mark.parametrize(("stop_after_epochs", "phase_at_stop"), [(1, 1), (2, 2), (4, 4)])
def test_a_run_stopped_in_any_phase_resumes_to_the_same_end(tmp_path, uninterrupted, stop_after_epochs, phase_at_stop):
    reference, ref_trainer, _ = uninterrupted
    stopped, _, ckpt = fit_to(tmp_path, stop_after_epochs)
    assert stopped.phase == phase_at_stop
    resumed, trainer, _ = fit_to(tmp_path, -1, ckpt_path=ckpt.last_model_path)
    assert trainer.current_epoch == ref_trainer.current_epoch == 5 and resumed.phase == 4
    assert resumed.routing_threshold == reference.routing_threshold
    assert_close(resumed.state_dict(), reference.state_dict(), rtol=0, atol=0)
    assert float(trainer.callback_metrics["val/ppl"]) == float(ref_trainer.callback_metrics["val/ppl"])


def test_every_checkpoint_loads_weights_only_and_validates_at_its_phases_depth(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    every = ModelCheckpoint(dirpath=tmp_path / "all", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    quiet_trainer(tmp_path, max_epochs=-1, enable_checkpointing=True, callbacks=[every]).fit(
        four_phase_model(), synthetic()
    )
    depth_of_phase = {1: 2, 2: 3, 3: 4, 4: 4}
    phases = {}
    for path in sorted((tmp_path / "all").glob("epoch=*.ckpt")):
        state = torch.load(path, weights_only=True)
        phase = state["phase"]["phase"]
        phases[state["epoch"]] = phase
        assert (state["hard_tokens"] is not None) == (phase == 3)
        module = four_phase_model()
        (metrics,) = quiet_trainer(tmp_path).validate(module, synthetic(), ckpt_path=str(path), verbose=False)
        assert module.phase == phase
        exits = {int(k.split("/")[1].removeprefix("exit")) for k in metrics if k.endswith("/ppl") and "exit" in k}
        assert max(exits) == depth_of_phase[phase], (path.name, exits)
    assert phases == {0: 1, 1: 2, 2: 3, 3: 4, 4: 4}  # each boundary's checkpoint is already the next phase's


def test_best_checkpoints_are_kept_per_phase_and_best_is_the_final_phases(tmp_path):
    module = four_phase_model()  # phases 2-4 have one validation each, the one that ends them
    ckpt = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/ppl", save_last=True)
    trainer = quiet_trainer(tmp_path, max_epochs=-1, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(module, synthetic())
    assert sorted(ckpt.phase_best_model_paths) == [1, 2, 3]
    for phase, path in ckpt.phase_best_model_paths.items():
        assert f"phase={phase}-" in path and torch.load(path, weights_only=True)["phase"]["phase"] == phase
    assert "phase=4-" in ckpt.best_model_path
    assert torch.load(ckpt.best_model_path, weights_only=True)["phase"]["phase"] == 4


def test_early_stopping_state_holds_no_copy_of_the_weights(tmp_path):
    ckpt = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/ppl", save_last=True)
    quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(
        four_phase_model(), synthetic()
    )
    state = torch.load(ckpt.last_model_path, weights_only=True)
    (stopping,) = [v for k, v in state["callbacks"].items() if k.startswith("PerplexityEarlyStopping")]
    tensors = [v for v in stopping.values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in tensors) <= 1 and "best_weights" not in stopping
    assert stopping["best_step"] == state["global_step"]  # the first validation is the best so far


def test_a_resume_that_cannot_find_the_phases_best_weights_fails_before_training(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    only_last = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[only_last]).fit(
        four_phase_model(), synthetic()
    )
    state = torch.load(only_last.last_model_path, weights_only=True)
    key = next(k for k in state["callbacks"] if k.startswith("PerplexityEarlyStopping"))
    state["callbacks"][key]["best_step"] = 1  # a best validation whose checkpoint is gone
    torch.save(state, tmp_path / "edited.ckpt")
    trainer = quiet_trainer(tmp_path, max_epochs=-1, enable_checkpointing=True, callbacks=[only_last])
    with pytest.raises(ValueError, match=r"best val/ppl of the running phase was at step 1 and no checkpoint"):
        trainer.fit(four_phase_model(), synthetic(), ckpt_path=str(tmp_path / "edited.ckpt"))
    assert trainer.global_step == 4  # nothing trained after the resume


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ([], r"phases must hold at least one phase, got an empty list"),
        ([Phase(max_epochs=1)], r"phases\[0\].layers=None is not allowed"),
        ([Phase(layers=3), Phase(layers=2)], r"phases\[1\].layers=2 is smaller than the previous phase's 3"),
        ([Phase(layers=2), Phase(layers=3, train=["layers 3-5"])], r"phases\[1\].train: 'layers 3-5' names layers"),
        ([Phase(layers=2), Phase(train=["exit 3"])], r"phases\[1\].train: 'exit 3' is not an exit of this phase"),
        ([Phase(layers=2), Phase(train=["decoder"])], r"phases\[1\].train: 'decoder' is not a part"),
        ([Phase(layers=2), Phase(train=["new"])], r"phases\[1\].train: 'new' names the layers this phase grows"),
        ([Phase(layers=2), {"layers": 3, "hard_ratio": 1.0, "tokens": "hard"}], r"phases\[1\].hard_ratio=1.0"),
        ([Phase(layers=2), {"layers": 3, "tokens": "hard", "hard_exit": 1}], r"phases\[1\].hard_exit=1 is not an exit"),
        ([Phase(layers=2, tokens="hard")], r"phases\[0\].tokens='hard' needs a trained exit"),
        ([Phase(layers=2), {"layers": 3, "patience": -1}], r"phases\[1\].patience=-1 is not allowed: an integer >= 0"),
        ([Phase(layers=2), {"layers": 3, "loss_weights": {5: 1.0}}], r"phases\[1\].loss_weights names exits \[5\]"),
        ([Phase(layers=2), {"layers": 3, "colour": "red"}], r"phases\[1\] has unknown fields \['colour'\]"),
        ([Phase(layers=2), {"train": ["classifier"]}], r"'classifier' needs the module's confidence='learned'"),
        # Draft mining: an exit compared with itself, a student not shallower than its teacher, an absent exit.
        (
            [Phase(layers=2), {"layers": 3, "tokens": "disagree", "hard_exit": 3}],
            r"phases\[1\].agree_with='last' is exit 3, the same exit as hard_exit=3: an exit never disagrees",
        ),
        (
            [Phase(layers=2), {"layers": 3, "loss_weights": {2: 1.0}, "distill": {3: 1.0}, "distill_from": 2}],
            r"phases\[1\].distill names exit 3, which is not shallower than distill_from=2",
        ),
        (
            [Phase(layers=2), {"layers": 3, "loss_weights": {3: 1.0}, "distill": 1.0}],
            r"phases\[1\].distill=1.0 distils no exit: none with a loss weight is shallower than distill_from='last'",
        ),
        (
            [Phase(layers=2), {"layers": 3, "loss_weights": {2: 1.0}, "distill": {2: 1.0}, "distill_from": 1}],
            r"phases\[1\].distill_from=1 is not an exit of this phase; its exits follow layers \(2, 3\)",
        ),
        (
            [Phase(layers=2), {"layers": 3, "loss_weights": {3: 1.0}, "distill": {2: 1.0}}],
            r"phases\[1\].distill names exit 2, whose loss weight is 0",
        ),
        (
            [Phase(layers=2), {"train": ["exit 1"], "loss_weights": {2: 1.0}}],
            r"phases\[1\].train: 'exit 1' is not an exit of this phase; its exits follow layers \(2,\)",
        ),
        ([Phase(layers=2, tokens="disagree")], r"phases\[0\].tokens='disagree' needs a trained exit.*model.pretrained"),
    ],
)
def test_a_bad_plan_fails_at_construction_with_the_phase_and_field_named(phases, message):
    with pytest.raises(ValueError, match=message):
        PhasedExitLM(phases=phases, vocab_size=64, d_model=32, n_heads=2, max_seq_len=16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hard_ratio": 0.0}, r"Phase.hard_ratio=0.0 is not allowed: a number in \(0, 1\)"),
        ({"max_epochs": 0}, r"Phase.max_epochs=0 is not allowed: a positive integer"),
        ({"lr_scale": {"layer 2": 0.1}}, r"Phase.lr_scale=.* keys among this phase's train parts None"),
        ({"lr_scale": -1.0}, r"Phase.lr_scale=-1.0 is not allowed"),
        ({"context": "none"}, r"Phase.context='none' is not allowed: 'none' only with tokens='hard'"),
        ({"loss_weights": {2: 0.0}}, r"at least one weight > 0"),
        ({"confidence": "learned"}, r"Phase.confidence='learned' is not allowed"),
        ({"confidence": "vibes"}, r"Phase.confidence: confidence='vibes' is not a known measure"),
        ({"distill_temperature": 0.0}, r"Phase.distill_temperature=0.0 is not allowed: a number > 0"),
        ({"distill_temperature": -1}, r"Phase.distill_temperature=-1 is not allowed: a number > 0"),
        ({"distill": 1.5}, r"Phase.distill=1.5 is not allowed: a share in \[0, 1\]"),
        ({"distill": {"middle": 1.0}}, r"Phase.distill=\{'middle': 1.0\} is not allowed"),
        ({"distill_target": "logits"}, r"Phase.distill_target='logits' is not allowed: one of \('softmax', 'greedy'\)"),
        ({"tokens": "disagree", "hard_exit": 2, "agree_with": 2}, r"Phase.agree_with=2 is not allowed: an exit other"),
        ({"tokens": "disagreeing"}, r"Phase.tokens='disagreeing' is not allowed: one of \('all', 'hard', 'disagree'"),
    ],
)
def test_a_bad_phase_fails_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Phase(layers=2, **kwargs)


def test_a_part_frozen_by_its_stage_never_trains_and_a_phase_of_only_such_parts_is_refused():
    from lego_lightning import Stage

    with pytest.raises(ValueError, match=r"phases\[1\].train=\['layer 1'\] trains nothing"):
        PhasedExitLM(
            phases=[Phase(layers=2), Phase(train=["layer 1"])],
            stages=[Stage((1, 1), trainable=False), Stage((2, 2))],
            vocab_size=64,
            d_model=32,
            n_heads=2,
            max_seq_len=16,
        )


def test_plain_ddp_is_refused_for_a_plan_and_allowed_for_one_phase(tmp_path, monkeypatch):
    monkeypatch.setattr("os.environ", dict(__import__("os").environ))
    trainer = quiet_trainer(tmp_path, max_epochs=-1, strategy="ddp", devices=1)
    with pytest.raises(ValueError, match=r"a plan of 4 phases changes which weights train.*ddp_find_unused"):
        trainer.fit(four_phase_model(), synthetic())
    single = PhasedExitLM(phases=[Phase(layers=2, max_epochs=1)], vocab_size=64, d_model=32, n_heads=2, max_seq_len=16)
    trainer = quiet_trainer(tmp_path, max_epochs=-1, strategy="ddp", devices=1)
    trainer.fit(single, synthetic())
    assert trainer.global_step > 0 and math.isfinite(float(trainer.callback_metrics["val/ppl"]))


def test_its_early_stopping_is_the_one_that_ends_phases(tmp_path):
    module = four_phase_model()
    trainer = quiet_trainer(tmp_path, max_epochs=-1, callbacks=[PerplexityEarlyStopping(patience=0)])
    trainer.fit(module, synthetic())
    stoppers = [cb for cb in trainer.callbacks if isinstance(cb, PerplexityEarlyStopping)]
    assert len(stoppers) == 1 and stoppers[0].restore_best_weights and module.phase == 4


def test_the_validation_that_ends_a_phase_ranks_in_that_phase_with_its_model(tmp_path):
    plan = [Phase(layers=2, max_epochs=1), Phase(layers=3, max_epochs=2, patience=5)]
    module = PhasedExitLM(phases=plan, vocab_size=64, d_model=32, n_heads=2, max_seq_len=16, lr=LR)
    ckpt = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/ppl", save_last=True)
    quiet_trainer(tmp_path, max_epochs=-1, enable_checkpointing=True, callbacks=[ckpt]).fit(module, synthetic())
    # Epoch 0's validation ended phase 1: it is phase 1's best, saved with phase 1's model before the change.
    (phase1,) = tmp_path.glob("phase=1-epoch=0-*.ckpt")
    assert ckpt.phase_best_model_paths == {1: str(phase1)}
    state = torch.load(phase1, weights_only=True)
    assert state["phase"]["phase"] == 1 and state["hard_tokens"] is None
    assert state["state_dict"]["model.blocks.2.mlp.proj.weight"].abs().sum() > 0  # layer 3 not yet grown (identity)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["phase"]["phase"] == 2 and "phase=2-" in ckpt.best_model_path


def test_the_monitor_that_ends_a_phase_may_name_the_first_and_last_exit():
    plan = [Phase(layers=3, loss_weights={1: 1.0}, max_epochs=1)]
    sizes = dict(vocab_size=64, d_model=32, n_heads=2, max_seq_len=16, stages=[{"layers": (1, 1)}, {"layers": (2, 3)}])
    module = PhasedExitLM(phases=plan, monitor="val/exit{first}/agree", mode="max", **sizes)
    (stopping,) = [c for c in module.configure_callbacks() if isinstance(c, PerplexityEarlyStopping)]
    assert module.monitor == stopping.monitor == "val/exit1/agree" and stopping.mode == "max"
    assert PhasedExitLM(phases=plan, monitor="val/exit{last}/loss", **sizes).monitor == "val/exit3/loss"
    with pytest.raises(
        ValueError, match=r"monitor='val/exit\{second\}/agree' is not allowed: .*\{first\} and \{last\}"
    ):
        PhasedExitLM(phases=plan, monitor="val/exit{second}/agree", **sizes)
    with pytest.raises(ValueError, match=r"mode='up' is not allowed: 'min' or 'max'"):
        PhasedExitLM(phases=plan, mode="up", **sizes)


def test_loss_weight_keys_written_as_text_are_layers():
    # JSON (and so hparams and --model.phases) can only give mapping keys as strings.
    assert Phase(layers=4, loss_weights={"2": 0.5, "4": 0.5}).loss_weights == {2: 0.5, 4: 0.5}
