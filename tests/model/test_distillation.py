"""Chunked distillation against torch's own KL divergence and argmax."""

import pytest
import torch
import torch.nn.functional as F

from lego_lightning.model.distillation import greedy_targets, linear_distillation
from lego_lightning.model.lean_loss import IGNORE_INDEX


def inputs(n=37, d=8, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    teacher_x, teacher_w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE_INDEX
    return x, w, teacher_x, teacher_w, targets


@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.5])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_the_loss_and_its_gradients_are_torchs_kl_divergence_times_the_temperature_squared(temperature, chunk_size):
    x, w, teacher_x, teacher_w, targets = inputs()
    loss = linear_distillation(x, w, teacher_x, teacher_w, targets, temperature, chunk_size)
    grads = torch.autograd.grad(loss, (x, w))
    keep = targets != IGNORE_INDEX
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    student = (x2 @ w2.t())[keep] / temperature
    teacher = (teacher_x @ teacher_w.t())[keep] / temperature
    expected = (
        F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
        * temperature**2
    )
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, (x2, w2))):
        torch.testing.assert_close(got, want)


def test_a_student_equal_to_its_teacher_has_zero_loss_and_no_gradient():
    x, w, _, _, targets = inputs()
    loss = linear_distillation(x, w, x.detach(), w.detach(), targets, 2.0, 5)
    grad_x, grad_w = torch.autograd.grad(loss, (x, w))
    assert abs(loss.item()) < 1e-6 and grad_x.abs().max() < 1e-6 and grad_w.abs().max() < 1e-6


def test_no_gradient_reaches_the_teacher_and_ignored_positions_give_none():
    x, w, teacher_x, teacher_w, targets = inputs()
    teacher_x.requires_grad_(True)
    loss = linear_distillation(x, w, teacher_x, teacher_w, targets)
    loss.backward()
    assert teacher_x.grad is None
    assert x.grad[targets == IGNORE_INDEX].abs().max() == 0 and x.grad[targets != IGNORE_INDEX].abs().max() > 0
    none = linear_distillation(x, w, teacher_x, teacher_w, torch.full_like(targets, IGNORE_INDEX))
    assert none.item() == 0.0


def test_greedy_targets_are_the_teachers_argmax_and_keep_ignored_positions():
    _, _, teacher_x, teacher_w, targets = inputs()
    keep = targets != IGNORE_INDEX
    got = greedy_targets(teacher_x, teacher_w, targets, chunk_size=4)
    assert torch.equal(got[keep], (teacher_x @ teacher_w.t()).argmax(-1)[keep])
    assert (got[~keep] == IGNORE_INDEX).all()


def test_a_temperature_that_is_not_positive_is_refused():
    x, w, teacher_x, teacher_w, targets = inputs()
    with pytest.raises(ValueError, match=r"temperature must be > 0, got 0.0"):
        linear_distillation(x, w, teacher_x, teacher_w, targets, 0.0)
