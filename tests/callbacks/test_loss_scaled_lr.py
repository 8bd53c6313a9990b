import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lego_lightning.callbacks import LossScaledLR
from tests.helpers import Regression, quiet_trainer


class StepProbe(Callback):
    """Per optimizer step: the scheduler's lrs, the mean loss, and the lr each group really used."""

    def __init__(self):
        self.steps, self._losses = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._losses:  # first micro-batch of a step
            self.scheduled = [g["lr"] for g in trainer.optimizers[0].param_groups]

    def on_before_backward(self, trainer, pl_module, loss):
        self._losses.append(loss.item())  # already divided by the accumulation factor

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = [p.detach().clone() for p in (pl_module.net.weight, pl_module.extra.weight)]
        self.grads = [p.grad.clone() for p in (pl_module.net.weight, pl_module.extra.weight)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not hasattr(self, "before"):
            return
        after = (pl_module.net.weight.detach(), pl_module.extra.weight.detach())
        used = [((b - a) / g).mean().item() for b, a, g in zip(self.before, after, self.grads)]
        self.steps.append({"scheduled": self.scheduled, "loss": sum(self._losses), "used": used})
        self._losses = []
        del self.before


def fit(tmp_path, module, callbacks, **kwargs):
    probe = StepProbe()
    trainer = quiet_trainer(tmp_path, max_steps=kwargs.pop("max_steps", 8), callbacks=[*callbacks, probe], **kwargs)
    trainer.fit(module)
    return probe.steps, trainer


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("mode", ["sd", "sd2"])
def test_the_step_uses_scheduler_lr_times_loss_power_and_the_schedule_keeps_its_shape(tmp_path, schedule, mode):
    torch.manual_seed(0)
    scaled, _ = fit(tmp_path, Regression(schedule, lrs=(0.05, 0.01)), [LossScaledLR(mode=mode)])
    torch.manual_seed(0)
    plain, _ = fit(tmp_path, Regression(schedule, lrs=(0.05, 0.01)), [])
    sign = 1 if mode == "sd2" else -1
    for step in scaled:
        factor = min(10.0, max(0.1, step["loss"] ** (sign / 3)))
        for used, scheduled in zip(step["used"], step["scheduled"]):
            assert used == pytest.approx(scheduled * factor, rel=1e-4)
    # The scheduler's own lrs are exactly those of a run without the callback.
    assert [s["scheduled"] for s in scaled] == [s["scheduled"] for s in plain]
    assert len({round(s["scheduled"][0], 8) for s in scaled}) == (1 if schedule == "constant" else 8)


def test_gradient_accumulation_uses_the_mean_micro_batch_loss(tmp_path):
    steps, _ = fit(tmp_path, Regression(), [LossScaledLR()], accumulate_grad_batches=2, max_steps=3)
    assert len(steps) == 3
    for step in steps:
        assert step["used"][0] == pytest.approx(step["scheduled"][0] * step["loss"] ** (1 / 3), rel=1e-4)


def test_scale_is_clamped_and_logged(tmp_path):
    callback = LossScaledLR(mode="sd2", max_scale=3.0)
    steps, trainer = fit(tmp_path, Regression(loss_factor=1e6), [callback], max_steps=2, log_every_n_steps=1)
    assert all(s["used"][0] == pytest.approx(3.0 * s["scheduled"][0], rel=1e-4) for s in steps)
    assert float(trainer.callback_metrics["train/lr_scale"]) == 3.0
    assert LossScaledLR(mode="sd", min_scale=0.5).scale_for(1e9, 0) == 0.5
    assert LossScaledLR(mode="sd").scale_for(0.0, 0) == 10.0  # 1/0 clamps to max_scale
    assert LossScaledLR(warmup_steps=4).scale_for(8.0, 2) == pytest.approx(1 + (2.0 - 1) * 2 / 4)


def test_a_non_finite_loss_keeps_the_scheduler_lr_and_warns_once(tmp_path):
    callback = LossScaledLR()
    with pytest.warns(UserWarning, match="LossScaledLR: the loss is nan") as caught:
        steps, _ = fit(tmp_path, Regression(nan_at_step=2), [callback], max_steps=5)
    assert len([w for w in caught if "LossScaledLR" in str(w.message)]) == 1
    assert steps[2]["used"][0] == pytest.approx(steps[2]["scheduled"][0], rel=1e-4)
    assert steps[3]["used"][0] != pytest.approx(steps[3]["scheduled"][0], rel=1e-4)
    assert callback.skipped_nonfinite == 1


def test_resume_restores_the_callback_state_and_continues_the_same_steps(tmp_path):
    # 8 batches per epoch; stop at the end of epoch 0 (Lightning restarts a part-done epoch's batches).
    torch.manual_seed(0)
    full, _ = fit(tmp_path / "a", Regression(nan_at_step=1), [LossScaledLR()], max_steps=12)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    torch.manual_seed(0)
    fit(tmp_path / "b", Regression(nan_at_step=1), [LossScaledLR(), ckpt], max_steps=8, enable_checkpointing=True)
    resumed_callback = LossScaledLR()
    probe = StepProbe()
    trainer = quiet_trainer(tmp_path / "b", max_steps=12, callbacks=[resumed_callback, probe])
    trainer.fit(Regression(nan_at_step=1), ckpt_path=ckpt.last_model_path)
    assert resumed_callback.skipped_nonfinite == 1  # the NaN step happened before the checkpoint
    # The first resumed step uses the lr the uninterrupted run used at that step. (Later batches
    # follow Lightning's own replay of the data after a resume, which this callback does not touch.)
    assert probe.steps[0]["loss"] == pytest.approx(full[8]["loss"], rel=1e-6)
    assert probe.steps[0]["used"] == pytest.approx(full[8]["used"], rel=1e-5)


def test_manual_optimization_is_refused_at_setup(tmp_path):
    class Manual(Regression):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    with pytest.raises(ValueError, match="LossScaledLR needs automatic optimization; Manual sets"):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[LossScaledLR()]).fit(Manual())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "sd3"}, r"mode='sd3' is not one of"),
        ({"power": 0.0}, r"power must be a finite number > 0"),
        ({"min_scale": 2.0}, r"0 < min_scale <= 1 <= max_scale"),
        ({"max_scale": math.inf}, r"max_scale"),
        ({"warmup_steps": -1}, r"warmup_steps must be an integer >= 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossScaledLR(**kwargs)
