"""ASHEM end to end on small synthetic data: phases, growth, freezing, hard tokens, resume."""

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.testing import assert_close

from lego_lightning import ASHEM
from lego_lightning.callbacks import BestAndLastCheckpoint
from lego_lightning.data.token_set import TokenSet
from tests.helpers import TINY_PHASED, quiet_trainer, synthetic, tiny_ashem

FROZEN = ("model.tok_emb.", "model.pos_emb.", "model.blocks.0.", "model.blocks.1.", "model.heads.0.")


def val_ppl(module, dm, exit_layer):
    """Perplexity of one exit over the validation set, computed directly."""
    module.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = module.model(batch["input_ids"], [exit_layer])[exit_layer]
            nll += F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum").item()
            n += batch["targets"].numel()
    module.train()
    return math.exp(nll / n)


class PhaseProbe(Callback):
    """Records phase 1's best val/ppl, and at phase 2's first batch (after growth) the model's state."""

    def __init__(self, dm):
        self.dm = dm
        self.phase1_best = math.inf
        self.start = None

    def on_validation_start(self, trainer, pl_module):
        self.validating_phase = pl_module.phase

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and self.validating_phase == 1:
            self.phase1_best = min(self.phase1_best, float(trainer.callback_metrics["val/ppl"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.phase == 2 and self.start is None:
            batch0 = next(iter(self.dm.val_dataloader()))["input_ids"]
            pl_module.eval()
            with torch.no_grad():
                shallow_logits = pl_module.model(batch0, [2])[2]
            pl_module.train()
            self.start = {
                "deep_ppl": val_ppl(pl_module, self.dm, 4),
                "shallow_ppl": val_ppl(pl_module, self.dm, 2),
                "shallow_logits": shallow_logits,
                "inputs": batch0,
                "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            }


class ProbedASHEM(ASHEM):
    """ASHEM whose probe runs after its own phase callbacks (growth happens first)."""

    def __init__(self, probe=None, **kwargs):
        super().__init__(**kwargs)
        self.probe = probe

    def configure_callbacks(self):
        return [*super().configure_callbacks(), *([self.probe] if self.probe else [])]


def probed(dm, **kwargs):
    probe = PhaseProbe(dm)
    return ProbedASHEM(probe=probe, **{**TINY_PHASED, "phase1_max_epochs": 3, **kwargs}), probe


def test_one_fit_runs_both_phases_with_growth_freezing_and_a_lower_lr(tmp_path):
    torch.manual_seed(0)
    module, dm = tiny_ashem(), synthetic()
    trainer = quiet_trainer(tmp_path, max_epochs=-1)
    trainer.fit(module, dm)
    assert module.phase == 2 and trainer.current_epoch == 4  # 2 epochs per phase, then the module stops the run
    assert module.routing_threshold is not None and 0 < module.routing_threshold < 1
    assert module.hard_mask.shape == (64, 16) and 0 < module.hard_mask.float().mean() < 1
    for name, param in module.named_parameters():
        assert param.requires_grad == (not name.startswith(FROZEN)), name
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert lrs["layers3-4"] == pytest.approx(3e-4) and lrs["layers1-2"] == pytest.approx(3e-4)
    metrics = trainer.callback_metrics
    assert {"ashem/phase", "val/exit2/ppl", "val/exit4/ppl", "val/routed/ppl", "val/exit4/hard_ppl"} <= set(metrics)
    assert metrics["val/ppl"] == metrics["val/routed/ppl"]


def test_identity_growth_starts_phase2_at_phase1s_best_and_freezing_keeps_the_shallow_exit(tmp_path):
    torch.manual_seed(0)
    dm = synthetic()
    module, probe = probed(dm, dropout=0.0)
    quiet_trainer(tmp_path, max_epochs=-1).fit(module, dm)
    # Phase 1's best weights came back before growth, and identity growth changed no output.
    assert probe.start["shallow_ppl"] == pytest.approx(probe.phase1_best, rel=1e-5)
    assert probe.start["deep_ppl"] == pytest.approx(probe.phase1_best, rel=1e-5)
    # Phase 2 trained the deep stage...
    assert val_ppl(module, dm, 4) != pytest.approx(probe.start["deep_ppl"], rel=1e-5)
    # ...and left the shallow exit's predictions and every frozen weight exactly as they were.
    module.eval()
    with torch.no_grad():
        after = module.model(probe.start["inputs"], [2])[2]
    assert torch.equal(after, probe.start["shallow_logits"])
    for name, value in module.state_dict().items():
        if name.startswith(FROZEN):
            assert torch.equal(value, probe.start["weights"][name]), name


def test_research_variant_shared_head_lets_the_shallow_exit_drift(tmp_path):
    torch.manual_seed(0)
    dm = synthetic()
    module, probe = probed(dm, head_sharing="shared", freeze_shallow_exit=False, phase2_context="none")
    quiet_trainer(tmp_path, max_epochs=-1).fit(module, dm)
    module.eval()
    with torch.no_grad():
        after = module.model(probe.start["inputs"], [2])[2]
    assert not torch.allclose(after, probe.start["shallow_logits"])
    assert "val/exit4/ppl" in quiet_trainer(tmp_path).validate(module, dm, verbose=False)[0]


class TargetRecorder(ASHEM):
    """ASHEM that records, at each training step, the targets its loss sees (after its own hard-token mask)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self._index = batch["index"].clone()
        return super().training_step(batch, batch_idx)

    def exit_losses(self, input_ids, targets):
        self.seen.append((self.phase, self._index, targets.clone()))
        return super().exit_losses(input_ids, targets)


def test_phase2_loss_covers_only_hard_tokens_with_whole_sequences(tmp_path):
    torch.manual_seed(0)
    module, dm = TargetRecorder(**TINY_PHASED), synthetic()
    trainer = quiet_trainer(tmp_path, max_epochs=-1)
    trainer.fit(module, dm)
    mask = module.hard_mask
    original = dm.splits["train"].targets
    recorder = module
    phase2 = [(i, t) for phase, i, t in recorder.seen if phase == 2]
    assert phase2
    for index, targets in phase2:
        hard = mask[index]
        assert torch.equal(targets[hard], original[index][hard])
        assert (targets[~hard] == -100).all()
    assert all((t != -100).all() for phase, _, t in recorder.seen if phase == 1)


def test_checkpoints_of_both_phases_load_with_weights_only(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = quiet_trainer(tmp_path, max_epochs=-1, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(tiny_ashem(), synthetic())
    phases = {}
    for path in sorted(tmp_path.glob("epoch=*.ckpt")):
        state = torch.load(path, weights_only=True)
        phases[state["epoch"]] = state["phase"]["phase"]
    assert phases == {0: 1, 1: 2, 2: 2, 3: 2}  # epoch 1 ends phase 1; its checkpoint already says phase 2
    # ...and already holds phase 2's model: calibrated, mined, grown (identity), with phase 2's loss weights.
    boundary = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    assert boundary["routing_threshold"] is not None
    hard = TokenSet.from_state(boundary["hard_tokens"])
    assert hard.to_mask().shape == (64, 16) and hard.count() > 0
    assert boundary["hard_tokens"]["bits"].shape == (64, 2)  # one bit per training token
    assert boundary["exit_loss_weights"] == [0.0, 1.0]
    assert boundary["state_dict"]["model.blocks.2.mlp.proj.weight"].abs().sum() == 0


def run_to_end(tmp_path, max_epochs, ckpt_path=None):
    torch.manual_seed(0)
    module = tiny_ashem(phase1_max_epochs=2, phase2_max_epochs=3)
    # The phase's best checkpoint is kept: a resumed phase restores its best weights from it at its end.
    ckpt = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/ppl", save_last=True)
    trainer = quiet_trainer(
        tmp_path, max_epochs=max_epochs, enable_checkpointing=True, callbacks=[ckpt], deterministic=True
    )
    trainer.fit(module, synthetic(), ckpt_path=ckpt_path)
    return module, trainer, ckpt


@pytest.mark.parametrize(("stop_after_epochs", "phase_at_stop"), [(1, 1), (4, 2)])
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, stop_after_epochs, phase_at_stop):
    reference, ref_trainer, _ = run_to_end(tmp_path / "full", -1)
    stopped, _, ckpt = run_to_end(tmp_path / "resumed", stop_after_epochs)
    assert stopped.phase == phase_at_stop
    resumed, trainer, _ = run_to_end(tmp_path / "resumed", -1, ckpt_path=ckpt.last_model_path)
    assert trainer.current_epoch == ref_trainer.current_epoch == 5
    assert resumed.phase == 2 and resumed.routing_threshold == reference.routing_threshold
    assert_close(resumed.state_dict(), reference.state_dict(), rtol=0, atol=0)
    for key in ("val/ppl", "val/exit2/ppl", "val/exit4/ppl", "val/routed/exit2_frac"):
        assert float(trainer.callback_metrics[key]) == float(ref_trainer.callback_metrics[key]), key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hard_ratio": 0.0}, r"ASHEM.hard_ratio must be in \(0, 1\), got 0.0"),
        ({"hard_ratio": 1.0}, r"ASHEM.hard_ratio must be in \(0, 1\), got 1.0"),
        ({"phase2_layers": 2}, r"phase2_layers=2 must be larger than phase1_layers=2"),
        ({"head_sharing": "shared"}, r"freeze_shallow_exit=True needs head_sharing='separate'"),
        ({"phase2_context": "cached"}, r"phase2_context='cached' is not one of \('full', 'none'\)"),
        ({"grow_init": "zeros"}, r"grow_init='zeros' is not one of"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_ashem(**kwargs)


def test_plain_ddp_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr("os.environ", dict(__import__("os").environ))
    trainer = quiet_trainer(tmp_path, max_epochs=-1, strategy="ddp", devices=1)
    with pytest.raises(ValueError, match=r"ddp_find_unused_parameters_true"):
        trainer.fit(tiny_ashem(), synthetic())
    assert trainer.global_step == 0


def test_the_report_leaves_blank_what_a_phase_does_not_have():
    module = tiny_ashem()
    phase1 = module.summary_table({"val/exit2/ppl": 12.3, "val/exit2/acc": 0.1, "val/exit2/hard_ppl": math.nan})
    assert "nan" not in phase1 and "12.30" in phase1 and "10.00%" in phase1
