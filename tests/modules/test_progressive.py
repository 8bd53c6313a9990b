import pytest
import torch

from lego_lightning import ProgressiveExitLM, Stage
from tests.helpers import TINY_PHASED, quiet_trainer, synthetic


def progressive(**kwargs):
    return ProgressiveExitLM(**{**TINY_PHASED, **kwargs})


def test_standard_progressive_grows_freezes_and_lowers_the_lr(tmp_path):
    torch.manual_seed(0)
    module = progressive()
    assert module.config.exit_layers == (3, 4) and module.exit_loss_weights == [1.0, 0.0]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_epochs=-1)
    trainer.fit(module, synthetic())
    assert module.phase == 2 and trainer.current_epoch == 4
    assert module.exit_loss_weights == [0.0, 1.0]
    frozen = ("model.tok_emb.", "model.pos_emb.", "model.blocks.0.", "model.blocks.1.", "model.blocks.2.")
    for name, param in module.named_parameters():
        assert param.requires_grad == (not name.startswith(frozen)), name
    # Random growth keeps the stage's own initialisation (no identity), and phase 2 trained it.
    assert not torch.equal(
        module.state_dict()["model.blocks.3.mlp.proj.weight"], before["model.blocks.3.mlp.proj.weight"]
    )
    assert before["model.blocks.3.mlp.proj.weight"].abs().sum() > 0
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert all(lr == pytest.approx(3e-4) for lr in lrs.values())
    assert {"val/exit3/ppl", "val/exit4/ppl", "progressive/phase"} <= set(trainer.callback_metrics)


def test_deep_supervision_progressive_trains_every_exit_in_phase_two(tmp_path):
    stages = [Stage((1, 1), 1 / 3), Stage((2, 2), 1 / 3), Stage((3, 3), 1 / 3)]
    module = progressive(stages=stages, phase2_loss_weights=[0.25] * 4)
    quiet_trainer(tmp_path, max_epochs=-1).fit(module, synthetic())
    assert module.config.exit_layers == (1, 2, 3, 4)
    assert module.exit_loss_weights == [0.25] * 4
    assert module.model.heads[0].proj.weight.requires_grad  # the shared head keeps training, as in the research


def test_phase_one_reports_only_its_own_exits(tmp_path):
    module = progressive()
    (metrics,) = quiet_trainer(tmp_path).validate(module, synthetic(), verbose=False)
    assert "val/exit3/ppl" in metrics and "val/exit4/ppl" not in metrics


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"phase2_layers": 3}, r"phase2_layers=3 must be larger than phase1_layers=3"),
        ({"phase2_loss_weights": [1.0]}, r"phase2_loss_weights=\[1.0\] must hold 2 weights"),
        ({"phase2_loss_weights": [0.0, 0.0]}, r"not all 0"),
        ({"stages": [Stage((1, 2))]}, r"stages end at layer 2 but the model has n_layers=3"),
        ({"phase1_max_epochs": 0}, r"phase1_max_epochs must be a positive integer, got 0"),
        ({"phase2_patience": -1}, r"phase2_patience must be an integer >= 0, got -1"),
        ({"phase2_lr_scale": 0.0}, r"phase2_lr_scale must be > 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        progressive(**kwargs)
