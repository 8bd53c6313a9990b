import pytest
import torch

from lego_lightning.model import route


def test_token_leaves_at_first_exit_reaching_the_threshold():
    conf = torch.tensor([[0.9, 0.2, 0.2, 0.5], [0.1, 0.6, 0.3, 0.1], [0.0, 0.0, 0.0, 0.0]])
    assert route(conf, 0.5).tolist() == [0, 1, 2, 0]


def test_threshold_zero_exits_all_at_the_first_and_one_at_the_last():
    conf = torch.rand(3, 100)
    conf[0, :5] = 1.0  # a saturated softmax must not leak tokens out at threshold 1
    assert (route(conf, 0.0) == 0).all()
    assert (route(conf, 1.0) == 2).all()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5"])
def test_threshold_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="threshold must be"):
        route(torch.rand(2, 3), bad)
