import pytest
import torch

from lego_lightning import Stage
from lego_lightning.evaluation import collect_exit_outputs, routed_metrics, threshold_sweep
from tests.helpers import quiet_trainer, synthetic, tiny_lm


def test_offline_sweep_matches_the_modules_own_routed_validation(tmp_path):
    torch.manual_seed(0)
    lm = tiny_lm(stages=[Stage((1, 1), 0.5), Stage((2, 3), 0.5)], lr=3e-3)
    dm = synthetic()
    quiet_trainer(tmp_path, max_steps=10, limit_val_batches=0).fit(lm, dm)
    outputs = collect_exit_outputs(lm, dm.val_dataloader())
    assert outputs.nll.shape == (2, 32 * 16)
    threshold = outputs.confidence[0].median().item()
    offline = routed_metrics(outputs, threshold, lm.config)
    lm.routing_threshold = threshold
    (online,) = quiet_trainer(tmp_path).validate(lm, dm, verbose=False)
    assert offline["ppl"] == pytest.approx(online["val/routed/ppl"], rel=1e-5)
    assert offline["acc"] == pytest.approx(online["val/routed/acc"])
    assert offline["fractions"][1] == pytest.approx(online["val/routed/exit1_frac"])
    assert offline["flops_ratio"] == pytest.approx(online["val/routed/flops_ratio"], rel=1e-6)
    assert outputs.exit_ppl(3) == pytest.approx(online["val/exit3/ppl"], rel=1e-5)
    # How often exit 1's greedy token is the deepest exit's: counted offline from the tokens, and in validation.
    agree = (outputs.predicted[0] == outputs.predicted[1]).float().mean().item()
    assert 0 < agree < 1 and outputs.agreement(1) == agree == pytest.approx(online["val/exit1/agree"])
    assert outputs.agreement(3) == online["val/exit3/agree"] == 1.0
    sweep = threshold_sweep(outputs, lm.config, [0.0, 1.0])
    assert sweep[0]["ppl"] == pytest.approx(outputs.exit_ppl(1)) and sweep[0]["fractions"][1] == 1.0
    assert sweep[1]["ppl"] == pytest.approx(outputs.exit_ppl(3)) and sweep[1]["layers_ratio"] == 1.0
    assert sweep[1]["flops_ratio"] > 1.0  # every token also paid for exit 1's head and confidence
