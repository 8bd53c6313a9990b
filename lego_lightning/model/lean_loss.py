"""Cross-entropy of a linear head, computed in chunks of tokens so no full logit tensor ever exists.

Deep supervision with ``E`` exits would otherwise hold ``E`` tensors of ``tokens x vocab``
logits (and their softmax and gradients) at once: at a 33K vocabulary and 2,048 tokens that is
270 MB per exit for the logits alone. Here each chunk's logits live only while that chunk's
loss and gradients are computed, in the forward pass; backward just scales the stored
gradients. The matrix products are the same as the plain loss's (no recomputation).
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # a target with this value counts in no loss and no metric (torch's default ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:  # type: ignore[override]
        n_valid = (targets != IGNORE_INDEX).sum()
        # Eager: one sync spares a masking pass over the logits below. Compiled: no sync (it would
        # break the graph), so always mask.
        all_valid = not torch.compiler.is_compiling() and bool(n_valid == targets.numel())
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], chunk_size):
            xc, yc = x[start : start + chunk_size], targets[start : start + chunk_size]
            logits = (xc @ weight.t()).float()  # (c, V): the only vocabulary-sized tensor, one chunk at a time
            valid = yc != IGNORE_INDEX
            safe = yc.clamp(min=0)
            logsumexp = logits.logsumexp(dim=-1)
            picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
            total += ((logsumexp - picked) * valid).sum()
            if need_x or need_w:
                # The softmax written over the logits: no second (chunk x vocab) tensor to allocate.
                grad = logits.sub_(logsumexp.unsqueeze(1)).exp_()
                grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
                if not all_valid:
                    grad *= valid.unsqueeze(1)
                if need_x:
                    grad_x[start : start + chunk_size] = (grad.to(weight.dtype) @ weight).to(x.dtype)
                if need_w:
                    grad_w += grad.t() @ xc.float()
        denominator = n_valid.clamp(min=1).float()
        ctx.save_for_backward(grad_x if need_x else None, grad_w if need_w else None, denominator)
        ctx.weight_dtype = weight.dtype
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        return *stored_gradients(ctx, grad_output), None, None


def stored_gradients(ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Backward of a chunked loss whose forward saved ``(grad_x, grad_w, denominator)``: the input's and the
    weight's gradients of the mean, scaled by ``grad_output``."""
    grad_x, grad_w, denominator = ctx.saved_tensors
    scale = grad_output / denominator
    dx = None if grad_x is None else grad_x * scale.to(grad_x.dtype)
    dw = None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype)
    return dx, dw


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 4096) -> Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``targets``, ignoring -100; 0 when none count.

    Args:
        x: ``(N, D)`` inputs of the output projection (after the exit's norm).
        weight: ``(V, D)`` the projection's weight (tied weights work: autograd sums the gradients).
        targets: ``(N,)`` token ids or -100.
        chunk_size: tokens per chunk; peak memory grows with ``chunk_size x V``, not ``N x V``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    return _LinearCrossEntropy.apply(x, weight, targets, chunk_size)
