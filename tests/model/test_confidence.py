import math

import pytest
import torch
from torch.testing import assert_close

from lego_lightning.model import (
    ConfidenceMeasure,
    available_confidences,
    confidence,
    get_confidence,
    register_confidence,
)


def test_known_values():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    assert_close(get_confidence("max_prob")(logits), torch.tensor([0.7, 1 / 3]))
    assert_close(get_confidence("margin")(logits), torch.tensor([0.5, 0.0]), atol=1e-6, rtol=0)
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert_close(get_confidence("entropy")(logits), torch.tensor([1 - entropy / math.log(3), 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["max_prob", "margin", "entropy"])
def test_every_measure_is_in_unit_interval_and_ranks_a_peaked_distribution_higher(name):
    torch.manual_seed(0)
    logits = torch.randn(50, 100)
    conf = get_confidence(name)(logits)
    assert conf.shape == (50,) and conf.min() >= 0 and conf.max() <= 1
    peaked = logits.clone()
    peaked[:, 0] += 20
    assert (get_confidence(name)(peaked) > conf).all()


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(
        ValueError,
        match=r"confidence='maxprob' is not a known measure; allowed: \('entropy', 'learned', 'margin', 'max_prob'",
    ):
        get_confidence("maxprob")


def test_registering_a_measure_makes_it_available_and_names_are_unique(monkeypatch):
    monkeypatch.setattr(confidence, "_REGISTRY", dict(confidence._REGISTRY))
    measure = ConfidenceMeasure("test_top_logit", lambda x: torch.sigmoid(x.amax(-1)), flops_per_element=1)
    register_confidence(measure)
    assert "test_top_logit" in available_confidences()
    assert get_confidence("test_top_logit").flops_per_token(10) == 10
    with pytest.raises(ValueError, match="already registered"):
        register_confidence(measure)
