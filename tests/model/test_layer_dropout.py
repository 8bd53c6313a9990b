"""Layer dropout: torchtune's rates, per-sample masks keyed by rank and step, skipped layers pass their input."""

import math

import pytest
import torch
from torch.testing import assert_close

from lego_lightning import SupervisedExitLM
from lego_lightning.model.layer_dropout import DEPTH_SCALES, LayerDropout, depth_scale


def torchtune_get_scale(scale_type: str, scale_period: int, val: int) -> float:
    """torchtune's ``modules/layer_dropout.get_scale`` as it is written there (0-based layer ``val``)."""
    if scale_period == 0:
        return 1
    return {
        "uniform": 1,
        "exp": math.exp(val * math.log(2) / scale_period) - 1,
        "linear": val / scale_period,
        "log": math.log(val + 1) / math.log(scale_period + 1),
        "sin": math.sin(0.5 * math.pi * val / scale_period),
        "sigmoid": 1 / (1 + math.exp(-10 * (val / scale_period - 0.5))),
        "step": 0 if val < scale_period else 1,
    }[scale_type]


@pytest.mark.parametrize("scale", DEPTH_SCALES)
@pytest.mark.parametrize("n_layers", [1, 2, 12])
def test_each_layers_rate_is_torchtunes(scale, n_layers):
    rates = LayerDropout(p_max=0.3, scale=scale).rates(n_layers, step=0)
    expected = [0.3 * torchtune_get_scale(scale, n_layers - 1, layer) for layer in range(n_layers)]
    assert rates == pytest.approx(expected)
    assert all(0.0 <= r <= 0.3 + 1e-12 for r in rates)
    if n_layers > 1 and scale != "uniform":
        assert depth_scale(scale, 1, n_layers) == pytest.approx(0.0, abs=0.01)  # sigmoid is 0.0067 at layer 1
        assert depth_scale(scale, n_layers, n_layers) == pytest.approx(1.0, abs=0.01)


def test_the_curriculum_ramps_p_max_linearly_over_its_steps():
    ramp = LayerDropout(p_max=0.2, scale="uniform", ramp_steps=10)
    assert ramp.rates(3, 0) == [0.0, 0.0, 0.0]
    assert ramp.rates(3, 5) == pytest.approx([0.1, 0.1, 0.1])
    assert ramp.rates(3, 10) == ramp.rates(3, 1000) == pytest.approx([0.2, 0.2, 0.2])


def test_masks_follow_their_key_and_the_rates():
    dropout = LayerDropout(p_max=0.5, scale="linear", seed=0)
    rates = dropout.rates(4, 0)  # 0, 1/6, 1/3, 1/2
    mask = dropout.keep_mask(4096, rates, (0, 7, 0))
    assert mask.shape == (4096, 4) and mask.dtype == torch.bool
    assert torch.equal(mask, dropout.keep_mask(4096, rates, (0, 7, 0)))  # the same key: the same draw
    dropped = 1 - mask.float().mean(0)
    assert dropped[0] == 0  # layer 1 never drops
    assert_close(dropped, torch.tensor(rates), atol=0.03, rtol=0)  # 4096 samples: 3 standard deviations
    for other in ((1, 7, 0), (0, 8, 0), (0, 7, 1)):  # another rank, step or micro-batch
        assert not torch.equal(mask, dropout.keep_mask(4096, rates, other))
    assert not torch.equal(mask, LayerDropout(p_max=0.5, scale="linear", seed=1).keep_mask(4096, rates, (0, 7, 0)))


def test_the_runs_seed_is_the_default(monkeypatch):
    rates = LayerDropout(p_max=0.5).rates(4, 0)
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    assert torch.equal(
        LayerDropout(p_max=0.5).keep_mask(64, rates, (0, 0, 0)),
        LayerDropout(0.5, seed=3).keep_mask(64, rates, (0, 0, 0)),
    )
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    assert not torch.equal(
        LayerDropout(p_max=0.5).keep_mask(64, rates, (0, 0, 0)),
        LayerDropout(0.5, seed=3).keep_mask(64, rates, (0, 0, 0)),
    )


def module(**kwargs):
    torch.manual_seed(0)
    return SupervisedExitLM(vocab_size=40, n_layers=3, d_model=16, n_heads=2, max_seq_len=16, exits="all", **kwargs)


def test_a_skipped_layer_passes_its_input_and_a_kept_one_runs():
    m = module()
    idx = torch.randint(0, 40, (3, 16))
    full = m.model.hidden_states(idx)
    keep = torch.tensor([[True, True, True], [False, True, True], [True, False, False]])
    dropped = m.model.hidden_states(idx, keep=keep)
    for k in (1, 2, 3):
        assert torch.equal(dropped[k][0], full[k][0])  # sample 0 runs every layer
    # Sample 1 skips layer 1: layer 2 reads the embedding.
    embedded = m.model.embed(idx[1:2])
    assert torch.equal(dropped[1][1], embedded[0])
    assert_close(dropped[2][1], m.model.blocks[1](embedded, None)[0])
    # Sample 2 skips layers 2 and 3: its state stays the first layer's.
    assert torch.equal(dropped[2][2], full[1][2]) and torch.equal(dropped[3][2], full[1][2])


def test_nothing_is_dropped_in_evaluation():
    m = module(layer_dropout={"p_max": 0.9, "scale": "uniform"})
    m.eval()
    batch = {"input_ids": torch.randint(0, 40, (4, 16)), "targets": torch.randint(0, 40, (4, 16))}
    m._evaluate(batch, 0, m.val_metrics)  # the module's own validation path, no mask
    plain = module()
    plain.eval()
    plain._evaluate(batch, 0, plain.val_metrics)
    assert m.val_metrics.compute() == plain.val_metrics.compute()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"p_max": 1.0}, r"layer_dropout.p_max=1.0 is not allowed: a rate in \[0, 1\)"),
        ({"p_max": -0.1}, r"layer_dropout.p_max=-0.1 is not allowed: a rate in \[0, 1\)"),
        ({"scale": "cubic"}, r"layer_dropout.scale='cubic' is not one of \('uniform', 'linear', 'exp'"),
        ({"ramp_steps": -1}, r"layer_dropout.ramp_steps=-1 is not allowed: an integer >= 0"),
        ({"rate": 0.1}, r"layer_dropout has unknown fields \['rate'\]"),
    ],
)
def test_bad_layer_dropout_is_refused_when_the_module_is_built(value, message):
    with pytest.raises(ValueError, match=message):
        module(layer_dropout=value)
