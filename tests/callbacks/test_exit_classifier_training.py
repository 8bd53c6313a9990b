import pytest
import torch

from lego_lightning import Stage
from lego_lightning.callbacks import ExitClassifierTraining
from lego_lightning.evaluation import collect_exit_outputs, routed_metrics
from lego_lightning.model.early_exit import routed_forward
from tests.helpers import quiet_trainer, synthetic, tiny_ashem, tiny_lm

STAGES = [Stage((1, 1), 0.5), Stage((2, 3), 0.5)]


def trained(tmp_path, target="consistency"):
    torch.manual_seed(0)
    lm = tiny_lm(stages=STAGES, confidence="learned", lr=3e-3)
    dm = synthetic(n_train=256)
    training = ExitClassifierTraining(target=target, lr=1e-2, epochs=4)
    quiet_trainer(tmp_path, max_epochs=4, limit_val_batches=0, callbacks=[training]).fit(lm, dm)
    return lm, dm, training


def test_the_classifier_learns_when_the_shallow_exit_agrees_with_the_deep_one(tmp_path):
    lm, dm, training = trained(tmp_path)
    stats = training.stats[1]
    assert training.applied and 0.5 < stats["label_rate"] < 1 and 0.5 < stats["accuracy"] <= 1
    assert not any(p.requires_grad for p in lm.exit_classifier.parameters())  # frozen again, out of DDP's way
    # Tokens the classifier trusts agree with the deep exit more often than those it doubts.
    lm.eval()
    batch = dm.splits["validation"]
    with torch.no_grad():
        hidden = lm.model.hidden_states(batch.input_ids)
        agree = lm.model.head(1)(hidden[1]).argmax(-1) == lm.model.head(3)(hidden[3]).argmax(-1)
        conf = lm.exit_classifier(1, hidden[1])
    trusted = conf >= conf.median()
    assert agree[trusted].float().mean() > agree[~trusted].float().mean() + 0.05  # untrained: no gap


def test_learned_routing_at_thresholds_0_and_1_and_its_cheaper_compute(tmp_path):
    lm, dm, _ = trained(tmp_path)
    outputs = collect_exit_outputs(lm, dm.val_dataloader())
    leave_all = routed_metrics(outputs, 0.0, lm.config, "learned")
    stay_all = routed_metrics(outputs, 1.0, lm.config, "learned")
    assert leave_all["ppl"] == pytest.approx(outputs.exit_ppl(1)) and stay_all["ppl"] == pytest.approx(
        outputs.exit_ppl(3)
    )
    # Same exit fractions, but continuing tokens skip the shallow head with the learned classifier.
    assert stay_all["flops_ratio"] < routed_metrics(outputs, 1.0, lm.config, "max_prob")["flops_ratio"]
    # The routed forward that skips work takes the classifier directly.
    idx = dm.splits["validation"].input_ids[:4]
    everyone_stays = routed_forward(lm.model, idx, 1.0, hidden_confidence=lm.hidden_confidence)
    assert torch.equal(everyone_stays.logits, lm.model(idx)[3])


def test_ashem_with_learned_confidence_runs_both_phases(tmp_path):
    torch.manual_seed(0)
    module = tiny_ashem(confidence="learned")
    trainer = quiet_trainer(tmp_path, max_epochs=-1)
    trainer.fit(module, synthetic())
    assert set(module.exit_classifier_stats) == {2}  # fitted when phase 2 started, at the shallow exit
    assert module.phase == 2 and module.routing_threshold is not None
    assert "val/routed/ppl" in trainer.callback_metrics


def test_needs_a_module_with_a_classifier(tmp_path):
    with pytest.raises(ValueError, match="build SupervisedExitLM with confidence='learned'"):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[ExitClassifierTraining()]).fit(tiny_lm(), synthetic())
    with pytest.raises(ValueError, match="target='agree' is not one of"):
        ExitClassifierTraining(target="agree")
