"""Distillation of a shallow exit toward a deeper one, computed in chunks of tokens as the lean loss is.

An exit that drafts for self-speculative decoding is worth the share of tokens on which its
greedy token is the final exit's. Training it on the final exit's distribution (the teacher)
instead of the data's next token aims at that directly. Two targets:

* :func:`linear_distillation`: the KL divergence from the teacher's softmax at temperature
  ``tau`` to the student's, times ``tau**2`` (Hinton et al. 2015, so the gradient's scale does not
  shrink with the temperature). As :mod:`~lego_lightning.model.lean_loss`, each chunk's student
  and teacher logits live only while the chunk's loss and gradients are computed, in the forward
  pass: no ``tokens x vocab`` tensor is kept, and nothing is recomputed in backward.
* :func:`greedy_targets`: the teacher's greedy token at each position, for the plain
  cross-entropy (the student learns the teacher's choice, not its distribution).

The teacher's inputs carry no gradient: it runs as it would at inference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lego_lightning.model.lean_loss import IGNORE_INDEX, stored_gradients


class _LinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        teacher_x: Tensor,
        teacher_weight: Tensor,
        valid: Tensor,
        temperature: float,
        chunk_size: int,
    ) -> Tensor:
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], chunk_size):
            xc, keep = x[start : start + chunk_size], valid[start : start + chunk_size].unsqueeze(1)
            teacher = (teacher_x[start : start + chunk_size] @ teacher_weight.t()).float().div_(temperature)
            teacher_log = teacher.log_softmax(dim=-1)
            student_log = (xc @ weight.t()).float().div_(temperature).log_softmax(dim=-1)
            teacher_prob = teacher_log.exp()
            # KL(teacher || student) = sum_v q_v (log q_v - log p_v), over the chunk's valid positions.
            total += (teacher_prob * (teacher_log - student_log) * keep).sum()
            if need_x or need_w:
                # d/d(student logits) of tau^2 KL = tau (p - q); the student's softmax written over its log.
                grad = student_log.exp_().sub_(teacher_prob).mul_(keep * temperature)
                if need_x:
                    grad_x[start : start + chunk_size] = (grad.to(weight.dtype) @ weight).to(x.dtype)
                if need_w:
                    grad_w += grad.t() @ xc.float()
        denominator = valid.sum().clamp(min=1).float()
        ctx.save_for_backward(grad_x if need_x else None, grad_w if need_w else None, denominator)
        ctx.weight_dtype = weight.dtype
        return total * temperature**2 / denominator

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        return *stored_gradients(ctx, grad_output), None, None, None, None, None


def linear_distillation(
    x: Tensor,
    weight: Tensor,
    teacher_x: Tensor,
    teacher_weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> Tensor:
    """Mean ``tau^2 KL(softmax(t / tau) || softmax(s / tau))`` over positions whose target is not -100.

    Args:
        x: ``(N, D)`` the student's inputs of its projection (after its exit's norm).
        weight: ``(V, D)`` the student's projection.
        teacher_x, teacher_weight: the teacher's, alike; no gradient reaches them.
        targets: ``(N,)``: only whether each is -100 (the position counts in no loss) is read.
        temperature: ``tau`` > 0.
        chunk_size: positions per chunk; peak memory grows with ``chunk_size x V``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    valid = targets != IGNORE_INDEX
    return _LinearDistillation.apply(
        x, weight, teacher_x.detach(), teacher_weight.detach(), valid, float(temperature), chunk_size
    )


@torch.no_grad()
def greedy_targets(teacher_x: Tensor, teacher_weight: Tensor, targets: Tensor, chunk_size: int = 4096) -> Tensor:
    """The teacher's greedy token at every position, -100 where ``targets`` is -100; ``(N,)``."""
    out = torch.empty_like(targets)
    for start in range(0, teacher_x.shape[0], chunk_size):
        logits = teacher_x[start : start + chunk_size] @ teacher_weight.t()
        out[start : start + chunk_size] = logits.argmax(dim=-1)
    return out.masked_fill(targets == IGNORE_INDEX, IGNORE_INDEX)
