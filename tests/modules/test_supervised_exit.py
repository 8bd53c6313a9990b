import math
import os

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.testing import assert_close

from lego_lightning import Stage, SupervisedExitLM
from lego_lightning.data import SyntheticDataModule
from lego_lightning.model.routing import route
from lego_lightning.modules.optim import WarmupSchedule
from tests.helpers import quiet_trainer, tiny_lm

THREE_EXITS = [Stage((1, 1), 0.2), Stage((2, 2), 0.3), Stage((3, 3), 0.5)]


def data(**kwargs):
    return SyntheticDataModule(
        **{"vocab_size": 64, "seq_len": 16, "batch_size": 16, "n_train": 64, "n_val": 32, **kwargs}
    )


def test_loss_is_the_weighted_sum_of_exit_losses():
    torch.manual_seed(0)
    lm = tiny_lm(stages=THREE_EXITS)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    losses = lm.exit_losses(x, y)
    logits = lm.model(x)
    for k in (1, 2, 3):
        assert_close(losses[k], F.cross_entropy(logits[k].flatten(0, 1), y.flatten()))
    loss = lm.training_step({"input_ids": x, "targets": y}, 0)
    assert_close(loss, sum(w * losses[k] for k, w in zip((1, 2, 3), (0.2, 0.3, 0.5))))


def test_exits_with_zero_weight_run_no_head_and_no_layer_above_the_deepest_trained_exit():
    lm = tiny_lm(head_sharing="separate", stages=[Stage((1, 1), 1.0), Stage((2, 2), 0.0), Stage((3, 3), 0.0)])
    calls = []
    for i, head in enumerate(lm.model.heads):
        head.norm.register_forward_hook(lambda m, a, o, i=i: calls.append(("head", i)))  # lean loss skips forward()
    for i, block in enumerate(lm.model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(("block", i)))
    losses = lm.exit_losses(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    assert list(losses) == [1]
    assert calls == [("block", 0), ("head", 0)]


def test_targets_marked_ignore_count_in_no_loss():
    lm = tiny_lm()
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    masked = y.clone()
    masked[:, :4] = -100
    logits = lm.model(x)[3]
    assert_close(lm.exit_losses(x, masked)[3], F.cross_entropy(logits[:, 4:].flatten(0, 1), y[:, 4:].flatten()))


@pytest.mark.parametrize(("threshold", "exit_taken"), [(0.0, 1), (1.0, 3)])
def test_routed_evaluation_at_threshold_0_and_1_equals_the_shallowest_and_deepest_exit(tmp_path, threshold, exit_taken):
    torch.manual_seed(0)
    lm = tiny_lm(stages=THREE_EXITS, routing_threshold=threshold)
    dm = data()
    trainer = quiet_trainer(tmp_path, max_steps=8)
    trainer.fit(lm, dm)
    (metrics,) = trainer.validate(lm, dm, verbose=False)
    assert metrics["val/routed/ppl"] == pytest.approx(metrics[f"val/exit{exit_taken}/ppl"], rel=1e-6)
    assert metrics["val/routed/acc"] == pytest.approx(metrics[f"val/exit{exit_taken}/acc"])
    assert metrics[f"val/routed/exit{exit_taken}_frac"] == 1.0
    assert metrics["val/ppl"] == metrics["val/routed/ppl"]
    assert metrics["val/routed/layers_ratio"] == pytest.approx(exit_taken / 3)


def test_routed_metrics_match_a_direct_computation(tmp_path):
    torch.manual_seed(1)
    lm = tiny_lm(stages=THREE_EXITS, lr=1e-2)
    dm = data(n_val=16, batch_size=16)
    quiet_trainer(tmp_path, max_steps=30, limit_val_batches=0).fit(lm, dm)
    batch = dm.splits["validation"]
    lm.eval()
    with torch.no_grad():
        logits = lm.model(batch.input_ids)
    y = batch.targets.flatten()
    nll = torch.stack([F.cross_entropy(logits[k].flatten(0, 1), y, reduction="none") for k in (1, 2, 3)])
    conf = torch.stack([logits[k].flatten(0, 1).softmax(-1).amax(-1) for k in (1, 2, 3)])
    threshold = conf[0].median().item()
    where = route(conf, threshold)
    assert 0.3 < (where == 0).float().mean() < 0.7
    lm.routing_threshold = threshold
    (metrics,) = quiet_trainer(tmp_path).validate(lm, dm, verbose=False)
    assert metrics["val/routed/ppl"] == pytest.approx(math.exp(nll.gather(0, where[None]).mean().item()), rel=1e-5)
    for i, k in enumerate((1, 2, 3)):
        assert metrics[f"val/routed/exit{k}_frac"] == pytest.approx((where == i).float().mean().item())
    assert metrics["val/exit2/ppl"] == pytest.approx(math.exp(nll[1].mean().item()), rel=1e-5)
    assert metrics["val/routed/flops_ratio"] > 0


def test_discriminative_learning_rates_compose_with_the_schedule(tmp_path):
    stages = [
        Stage((1, 1), 0.0, lr_scale=1.0),
        Stage((2, 2), 0.0, lr_scale=0.5),
        Stage((3, 3), 1.0, lr_scale=0.25),
    ]
    lm = tiny_lm(stages=stages, lr=1e-2, scheduler="cosine", warmup_steps=2, min_lr_ratio=0.1)
    trainer = quiet_trainer(tmp_path, max_steps=7, limit_val_batches=0)
    trainer.fit(lm, data())
    factor = WarmupSchedule("cosine", 2, 7, 0.1)(7)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["layers1-1"]["lr"] == pytest.approx(1e-2 * 1.0 * factor)
    assert groups["layers2-2"]["lr"] == pytest.approx(1e-2 * 0.5 * factor)
    assert groups["layers3-3"]["lr"] == pytest.approx(1e-2 * 0.25 * factor)
    # Norms, biases and embeddings take no weight decay; linear weights do.
    assert groups["layers1-1/no_decay"]["weight_decay"] == 0.0 and groups["layers1-1"]["weight_decay"] == 0.01
    embedding = lm.model.tok_emb.weight
    assert any(p is embedding for p in groups["layers1-1/no_decay"]["params"])


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_shapes(kind):
    s = WarmupSchedule(kind, warmup_steps=4, total_steps=14, min_lr_ratio=0.0)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    end = {"constant": 1.0, "linear": 0.0, "cosine": 0.0}[kind]
    mid = {"constant": 1.0, "linear": 0.5, "cosine": 0.5}[kind]
    assert s(9) == pytest.approx(mid) and s(14) == pytest.approx(end)


def test_untrainable_stage_is_frozen_and_left_out_of_the_optimizer(tmp_path):
    lm = tiny_lm(stages=[Stage((1, 1), 0.5, trainable=False), Stage((2, 3), 0.5)])
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(lm, data())
    after = lm.model.state_dict()
    assert_close(after["blocks.0.mlp.fc.weight"], before["blocks.0.mlp.fc.weight"])
    assert_close(after["tok_emb.weight"], before["tok_emb.weight"])
    assert not torch.equal(after["blocks.1.mlp.fc.weight"], before["blocks.1.mlp.fc.weight"])
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert not any(n.startswith("layers1-1") for n in names)


def test_checkpoint_loads_with_weights_only_and_keeps_exit_weights(tmp_path):
    lm = tiny_lm(stages=THREE_EXITS)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(lm, data())
    state = torch.load(ckpt.last_model_path, weights_only=True)
    assert state["hyper_parameters"]["stages"][0] == {
        "layers": [1, 1],
        "loss_weight": 0.2,
        "lr_scale": 1.0,
        "trainable": True,
    }
    assert state["exit_loss_weights"] == [0.2, 0.3, 0.5]
    restored = SupervisedExitLM.load_from_checkpoint(ckpt.last_model_path)
    assert restored.config == lm.config
    assert_close(restored.state_dict(), lm.state_dict())


def test_checkpoint_of_another_shape_or_vocabulary_fails_with_the_field_named(tmp_path):
    lm = tiny_lm()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[ckpt]).fit(lm, data())
    wider = tiny_lm(d_model=32)
    with pytest.raises(ValueError, match=r"the checkpoint has d_model=16 but this model has d_model=32"):
        quiet_trainer(tmp_path).validate(wider, data(), ckpt_path=ckpt.last_model_path)
    other_vocab = tiny_lm(vocab_size=80)
    with pytest.raises(
        ValueError,
        match=r"the checkpoint has vocab_size=64 but this model has vocab_size=80 \(vocab_size comes from the data",
    ):
        quiet_trainer(tmp_path).validate(other_vocab, data(vocab_size=80), ckpt_path=ckpt.last_model_path)
    swiglu = tiny_lm(activation="swiglu")
    with pytest.raises(ValueError, match=r"the checkpoint has activation=gelu but this model has activation=swiglu"):
        quiet_trainer(tmp_path).validate(swiglu, data(), ckpt_path=ckpt.last_model_path)


def test_sequence_longer_than_the_context_fails_before_training(tmp_path):
    lm = tiny_lm(max_seq_len=8)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"data.seq_len=16 is larger than the model's context model.max_seq_len=8"):
        trainer.fit(lm, data())
    assert trainer.global_step == 0


def test_vocab_size_mismatch_with_the_data_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"model.vocab_size=50 but the data has vocab_size=64"):
        quiet_trainer(tmp_path, max_steps=1).fit(tiny_lm(vocab_size=50), data())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"routing_threshold": 1.5}, r"routing_threshold must be in \[0, 1\], got 1.5"),
        ({"routing_threshold": -0.1}, r"routing_threshold must be in \[0, 1\], got -0.1"),
        ({"confidence": "softmax"}, r"confidence='softmax' is not a known measure; allowed: "),
        ({"scheduler": "step"}, r"scheduler='step' is not one of"),
        ({"lr": 0.0}, r"lr must be > 0"),
        ({"stages": [{"layers": [1, 2]}]}, r"stages end at layer 2 but the model has n_layers=3"),
    ],
)
def test_bad_module_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_lm(**kwargs)


def test_ddp_without_unused_parameter_search_rejects_untrained_separate_heads(tmp_path, monkeypatch):
    # Lightning's DDP sets LOCAL_RANK, MASTER_PORT, ... in os.environ; keep them out of later tests.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    lm = tiny_lm(head_sharing="separate", stages=[Stage((1, 1), 0.0), Stage((2, 3), 1.0)])
    trainer = quiet_trainer(tmp_path, max_steps=1, strategy="ddp", devices=1)
    with pytest.raises(
        ValueError,
        match=r"stages \[\(1, 1\)\] have trainable weights that get no gradient.*ddp_find_unused_parameters_true",
    ):
        trainer.fit(lm, data())


def test_set_exit_loss_weights_checks_its_input():
    lm = tiny_lm(stages=THREE_EXITS)
    lm.set_exit_loss_weights([0, 0, 1])
    assert lm.exit_loss_weights == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="got 2 exit loss weights for 3 exits"):
        lm.set_exit_loss_weights([0.5, 0.5])
    with pytest.raises(ValueError, match="not all 0"):
        lm.set_exit_loss_weights([0, 0, 0])


def test_masked_objective_attends_both_ways_and_scores_masked_tokens_only(tmp_path):
    torch.manual_seed(0)
    lm = tiny_lm(objective="masked", stages=THREE_EXITS, routing_threshold=0.5)
    assert not lm.config.causal and lm.config.vocab_size == 65  # one extra input id for <mask>
    dm = data()
    batch = next(iter(dm.val_dataloader()))
    inputs, targets = lm.model_inputs(batch, batch_idx=0)
    again, _ = lm.model_inputs(batch, batch_idx=0)
    assert torch.equal(inputs, again)  # validation masks the same positions every epoch
    chosen = targets != -100
    assert 0.05 < chosen.float().mean() < 0.3 and (inputs == 64).any()
    losses = lm.exit_losses(inputs, targets)
    logits = lm.model(inputs)[3]
    assert_close(losses[3], F.cross_entropy(logits[chosen], batch["input_ids"][chosen]))
    trainer = quiet_trainer(tmp_path, max_steps=3)
    trainer.fit(lm, dm)
    (metrics,) = trainer.validate(lm, dm, verbose=False)
    assert {"val/exit1/ppl", "val/exit3/acc", "val/routed/ppl"} <= set(metrics)
    with pytest.raises(ValueError, match=r"objective='mlm' is not one of \('causal', 'masked'\)"):
        tiny_lm(objective="mlm")
