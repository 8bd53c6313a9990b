import pytest
import torch

from lego_lightning import Stage
from lego_lightning.callbacks import QuantileThresholdCalibration
from lego_lightning.callbacks.quantile_threshold_calibration import (
    confidence_histogram,
    threshold_for_ratio,
    upper_edge,
)
from tests.helpers import quiet_trainer, synthetic, tiny_lm


def test_threshold_marks_the_ratio_within_one_bin_beyond_torch_quantiles_limit():
    n = 2**24 + 12_345  # torch.quantile refuses more than 2**24 elements
    conf = torch.rand(n, generator=torch.Generator().manual_seed(0)) ** 3  # skewed, like softmax maxima
    with pytest.raises(RuntimeError):
        torch.quantile(conf, 0.5)
    bins = 1000
    counts = confidence_histogram(conf, bins)
    assert counts.dtype == torch.long and int(counts.sum()) == n
    one_bin = counts.max().item() / n
    for ratio in (0.1, 0.5, 0.83):
        t = threshold_for_ratio(counts, ratio)
        below = (conf < t).float().mean().item()
        assert ratio <= below < ratio + one_bin
        assert (conf < t * 0.98).float().mean().item() < ratio  # one bin lower would be too few (edges 1.4% apart)


def test_small_confidences_of_a_large_vocabulary_still_split_at_the_ratio():
    # Max-softmax of a barely trained 33K-word model: every token between 3e-5 and 4e-5.
    conf = 3e-5 + 1e-5 * torch.rand(100_000, generator=torch.Generator().manual_seed(1))
    counts = confidence_histogram(conf, 65_536)
    t = threshold_for_ratio(counts, 0.5)
    assert (conf < t).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_histogram_edges_and_bad_ratio():
    # 4 log-spaced bins from 1e-6 to 1: upper edges 10^-4.5, 10^-3, 10^-1.5, 1.
    assert [round(upper_edge(i, 4), 8) for i in range(4)] == [round(10**-4.5, 8), 0.001, round(10**-1.5, 8), 1.0]
    counts = confidence_histogram(torch.tensor([0.0, 1e-5, 0.0005, 0.01, 0.5, 1.0]), 4)
    assert counts.tolist() == [2, 1, 1, 2]  # 0 and anything under 1e-6 count in the first bin; 1.0 in the last
    assert threshold_for_ratio(counts, 0.5) == pytest.approx(0.001)  # 3 of 6 below 1e-3
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\)"):
        threshold_for_ratio(counts, 1.0)


@pytest.mark.parametrize(("kwargs", "message"), [({"hard_ratio": 0.0}, "hard_ratio must be in"), ({"bins": 1}, "bins")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantileThresholdCalibration(**kwargs)


def test_calibrates_on_held_out_tokens_before_every_validation(tmp_path):
    torch.manual_seed(0)
    lm = tiny_lm(stages=[Stage((1, 1), 0.5), Stage((2, 3), 0.5)], routing_threshold=0.5, lr=3e-3)
    dm = synthetic()
    calibration = QuantileThresholdCalibration(hard_ratio=0.3, at_phase=None, bins=2000)
    trainer = quiet_trainer(tmp_path, max_steps=12, callbacks=[calibration])
    trainer.fit(lm, dm)
    assert lm.routing_threshold == calibration.threshold != 0.5
    lm.eval()
    held_out = dm.splits["calibration"]
    conf = lm.token_confidence(held_out.input_ids, 1).flatten()
    below = (conf < lm.routing_threshold).float().mean().item()
    share_of_a_bin = confidence_histogram(conf, 2000).max().item() / conf.numel()
    assert 0.3 <= below < 0.3 + share_of_a_bin
    (metrics,) = quiet_trainer(tmp_path, callbacks=[calibration]).validate(lm, dm, verbose=False)
    assert metrics["val/routed/exit1_frac"] == pytest.approx(
        1 - below, abs=0.15
    )  # validation tokens, not held-out ones


def test_module_without_the_contract_is_refused_at_setup(tmp_path):
    from tests.callbacks.test_perplexity_early_stopping import ScriptedCurve

    with pytest.raises(TypeError, match="needs a LightningModule with token_confidence"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[QuantileThresholdCalibration()]).fit(ScriptedCurve([1.0]))
