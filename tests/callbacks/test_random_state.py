"""Exact resume with dropout: random states in checkpoints, data order restored, no validation skipped.

Each case stops a run at one point by raising from a callback (the process goes on, but
nothing after that point reaches a checkpoint, as with a kill), resumes a fresh module from
``last.ckpt`` and compares it with a run that was never stopped. Real SIGKILLs of the CLI
are in ``tests/test_faults.py``.
"""

import random

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.testing import assert_close

from lego_lightning.callbacks import BestAndLastCheckpoint, RandomStateCheckpoint
from lego_lightning.callbacks.random_state import collect_random_states, restore_random_states
from tests.helpers import quiet_trainer, synthetic, tiny_ashem, tiny_lm


class Stop(Exception):
    pass


class StopAt(Callback):
    """Raises at ``hook`` when the global step is ``step``: the run ends there, mid-flight."""

    def __init__(self, hook, step):
        self.hook, self.step = hook, step

    def _maybe_stop(self, trainer, hook):
        if hook == self.hook and trainer.global_step == self.step and not trainer.sanity_checking:
            raise Stop(f"{hook} at step {trainer.global_step}")

    def on_train_batch_end(self, trainer, *args):
        self._maybe_stop(trainer, "train_batch_end")

    def on_validation_batch_end(self, trainer, *args):
        self._maybe_stop(trainer, "validation_batch_end")

    def on_validation_end(self, trainer, *args):
        self._maybe_stop(trainer, "validation_end")


class WithoutRandomStates:
    """Mixin: the module leaves RandomStateCheckpoint out, to show what it is for."""

    def configure_callbacks(self):
        return [cb for cb in super().configure_callbacks() if not isinstance(cb, RandomStateCheckpoint)]


def run(make_module, root, stop=None, ckpt_path=None, every_n_train_steps=3):
    L.seed_everything(0)
    module = make_module()
    checkpoint = BestAndLastCheckpoint(
        dirpath=root, monitor="val/ppl", save_last=True, every_n_train_steps=every_n_train_steps
    )
    trainer = quiet_trainer(
        root,
        max_epochs=-1 if hasattr(module, "phase") else 5,
        enable_checkpointing=True,
        callbacks=[checkpoint, *([stop] if stop else [])],
        num_sanity_val_steps=2,
    )
    try:
        trainer.fit(module, synthetic(), ckpt_path=ckpt_path)
    except Stop:
        assert stop is not None
    return module, trainer


def stopped_and_resumed(make_module, tmp_path, stop, **kwargs):
    reference, ref_trainer = run(make_module, tmp_path / "full", **kwargs)
    run(make_module, tmp_path / "resumed", stop=stop, **kwargs)
    resumed, trainer = run(
        make_module, tmp_path / "resumed", ckpt_path=str(tmp_path / "resumed" / "last.ckpt"), **kwargs
    )
    return (reference, ref_trainer), (resumed, trainer)


def lm_with_dropout():
    return tiny_lm(dropout=0.1, max_seq_len=16)


def ashem_with_dropout():
    return tiny_ashem(dropout=0.1, phase1_max_epochs=2, phase2_max_epochs=3)


def test_states_round_trip_and_load_with_weights_only(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = collect_random_states()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    torch.save({"states": [state]}, tmp_path / "s.pt")
    restore_random_states(torch.load(tmp_path / "s.pt", weights_only=True)["states"][0])
    assert_close(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


@pytest.mark.parametrize(
    ("hook", "step"),
    [
        ("train_batch_end", 7),  # mid-epoch: resumes from step 6, two of epoch 1's four batches done
        ("validation_end", 8),  # after epoch 1's validation, before its checkpoint
        ("validation_batch_end", 12),  # in the validation after step 12, whose step checkpoint waits for it
    ],
)
def test_a_resumed_run_with_dropout_is_bit_identical(tmp_path, hook, step):
    (reference, ref_trainer), (resumed, trainer) = stopped_and_resumed(lm_with_dropout, tmp_path, StopAt(hook, step))
    assert trainer.global_step == ref_trainer.global_step == 20
    assert_close(resumed.state_dict(), reference.state_dict(), rtol=0, atol=0)
    assert float(trainer.callback_metrics["val/ppl"]) == float(ref_trainer.callback_metrics["val/ppl"])


def lm_with_layer_dropout():
    return tiny_lm(dropout=0.1, max_seq_len=16, exits="all", layer_dropout={"p_max": 0.5, "scale": "linear"})


@pytest.mark.parametrize(("hook", "step"), [("train_batch_end", 7), ("validation_end", 8)])
def test_a_resumed_run_with_layer_dropout_is_bit_identical(tmp_path, hook, step):
    (reference, ref_trainer), (resumed, trainer) = stopped_and_resumed(
        lm_with_layer_dropout, tmp_path, StopAt(hook, step)
    )
    assert trainer.global_step == ref_trainer.global_step == 20
    assert_close(resumed.state_dict(), reference.state_dict(), rtol=0, atol=0)
    # The layers did drop: the same run without layer dropout ends elsewhere.
    plain, _ = run(lambda: tiny_lm(dropout=0.1, max_seq_len=16, exits="all"), tmp_path / "plain")
    assert not torch.equal(plain.model.blocks[2].mlp.fc.weight, reference.model.blocks[2].mlp.fc.weight)


def test_without_the_random_states_a_resumed_run_with_dropout_differs(tmp_path):
    class LM(WithoutRandomStates, type(lm_with_dropout())):
        pass

    def make():
        return LM(vocab_size=64, n_layers=3, d_model=16, n_heads=2, max_seq_len=16, dropout=0.1)

    (reference, _), (resumed, _) = stopped_and_resumed(make, tmp_path, StopAt("validation_end", 8))
    assert not torch.equal(resumed.model.tok_emb.weight, reference.model.tok_emb.weight)


@pytest.mark.parametrize(
    ("hook", "step"),
    [
        ("train_batch_end", 7),  # phase 1, mid-epoch
        ("validation_end", 8),  # the validation that ends phase 1, before the phase change reaches a checkpoint
        ("validation_batch_end", 12),  # in phase 2's first validation, whose step checkpoint waits for it
        ("train_batch_end", 16),  # phase 2, mid-epoch
    ],
)
def test_ashem_with_dropout_resumes_exactly_in_any_phase(tmp_path, hook, step):
    (reference, ref_trainer), (resumed, trainer) = stopped_and_resumed(ashem_with_dropout, tmp_path, StopAt(hook, step))
    assert trainer.global_step == ref_trainer.global_step == 20
    assert resumed.phase == reference.phase == 2
    assert resumed.routing_threshold == reference.routing_threshold
    assert_close(resumed.state_dict(), reference.state_dict(), rtol=0, atol=0)
    for key in ("val/ppl", "val/exit2/ppl", "val/exit4/ppl", "val/routed/exit2_frac"):
        assert float(trainer.callback_metrics[key]) == float(ref_trainer.callback_metrics[key]), key


def test_a_run_resumed_after_it_stopped_stays_stopped(tmp_path):
    """Killed after its last checkpoint (say, during the final report): resuming trains nothing more."""
    reference, ref_trainer = run(ashem_with_dropout, tmp_path)
    written = (tmp_path / "last.ckpt").read_bytes()
    resumed, trainer = run(ashem_with_dropout, tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == ref_trainer.global_step
    assert_close(resumed.state_dict(), reference.state_dict(), rtol=0, atol=0)
    assert (tmp_path / "last.ckpt").read_bytes() == written  # not rewritten with other loop counters
