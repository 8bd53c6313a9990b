import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lego_lightning.model.lean_loss import linear_cross_entropy


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_loss(seed, chunk):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(97, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 97, (50,), generator=g)
    y[::5] = -100  # ignored targets count nowhere
    plain = F.cross_entropy(x @ w.t(), y, ignore_index=-100)
    gx, gw = torch.autograd.grad(plain, (x, w))
    lean = linear_cross_entropy(x, w, y, chunk_size=chunk)
    lx, lw = torch.autograd.grad(lean * 1.0, (x, w))
    assert_close(lean, plain)
    assert_close(lx, gx)
    assert_close(lw, gw)


def test_upstream_gradient_is_applied_and_all_ignored_gives_zero():
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(11, 4, requires_grad=True)
    y = torch.randint(0, 11, (8,))
    (3.0 * linear_cross_entropy(x, w, y, 3)).backward()
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (3.0 * F.cross_entropy(ref_x @ ref_w.t(), y)).backward()
    assert_close(x.grad, ref_x.grad)
    assert_close(w.grad, ref_w.grad)
    none = linear_cross_entropy(x, w, torch.full((8,), -100), 3)
    assert none.item() == 0.0
    none.backward()  # a batch with no target still backpropagates (zeros), as DDP needs


def test_without_grad_it_only_scores():
    x, w, y = torch.randn(5, 4), torch.randn(6, 4), torch.randint(0, 6, (5,))
    with torch.no_grad():
        assert_close(linear_cross_entropy(x, w, y, 2), F.cross_entropy(x @ w.t(), y))
