import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lego_lightning.callbacks import LayerExpansion, LayerFreeze
from tests.callbacks.test_perplexity_early_stopping import ScriptedCurve
from tests.helpers import quiet_trainer, synthetic, tiny_lm

TARGETS = ["model.tok_emb", "model.blocks.0"]


def test_freeze_stops_updates_and_survives_resume(tmp_path):
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    lm = tiny_lm()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    quiet_trainer(
        tmp_path,
        max_steps=3,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[LayerFreeze(TARGETS, at_phase=1), ckpt],
    ).fit(lm, synthetic())
    # Resume with a fresh module: the freeze comes back from the checkpoint before any step.
    resumed = tiny_lm()
    quiet_trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[LayerFreeze(TARGETS, at_phase=1)]).fit(
        resumed, synthetic(), ckpt_path=ckpt.last_model_path
    )
    for name, param in resumed.named_parameters():
        frozen = name.startswith(("model.tok_emb.", "model.blocks.0."))
        assert param.requires_grad == (not frozen), name
        if frozen:
            assert torch.equal(param.detach(), before[name]), name
        elif name.startswith("model.blocks.1."):
            assert not torch.equal(param.detach(), before[name]), name


def test_a_freeze_target_that_does_not_exist_fails_before_training(tmp_path):
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[LayerFreeze(["model.blocks.9"], at_phase=1)])
    with pytest.raises(ValueError, match=r"LayerFreeze targets \['model.blocks.9'\] do not exist in SupervisedExitLM"):
        trainer.fit(tiny_lm(), synthetic())
    assert trainer.global_step == 0


def test_freeze_under_plain_ddp_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("os.environ", dict(__import__("os").environ))
    trainer = quiet_trainer(tmp_path, max_steps=2, strategy="ddp", devices=1, callbacks=[LayerFreeze(TARGETS)])
    with pytest.raises(ValueError, match=r"strategy='ddp_find_unused_parameters_true'"):
        trainer.fit(tiny_lm(), synthetic())


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"modules": []}, "non-empty list"), ({"modules": ["a"], "at_phase": 0}, "at_phase")]
)
def test_bad_freeze_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerFreeze(**kwargs)


def test_expansion_needs_an_expand_method(tmp_path):
    with pytest.raises(TypeError, match=r"LayerExpansion needs a LightningModule with expand\(init\)"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[LayerExpansion()]).fit(ScriptedCurve([1.0]))
    with pytest.raises(ValueError, match=r"LayerExpansion.init='zeros' is not one of"):
        LayerExpansion(init="zeros")
