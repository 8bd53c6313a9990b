"""How a token is chosen from an exit's logits, and each request's own random stream.

Greedy takes the argmax. Sampling divides the logits by the temperature, keeps the ``top_k``
most likely tokens and the smallest set whose probability reaches ``top_p`` (the nucleus), and
draws by inverse transform: one uniform number from the request's own generator, looked up in
the cumulative distribution. Every draw of a request comes from its own generator in an order
fixed by its own history, so it gets the same tokens alone or beside any other request.

The nucleus is found with ``topk`` over a few candidates, widened only for rows whose nucleus
is larger, not with a sort of the whole vocabulary: at a vocabulary of 8K, sorting every
position of a verification cost as much as the verification's layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Candidates that topk looks at first for top-p; rows whose nucleus is larger are looked at again, 8x wider.
NUCLEUS_CANDIDATES = 64


@dataclass(frozen=True)
class Sampling:
    """How a token is chosen from an exit's logits: greedy at ``temperature`` 0, else sampled.

    Sampling divides the logits by ``temperature``, keeps the ``top_k`` most likely tokens and
    the smallest set whose probability reaches ``top_p``, then draws from each sequence's own
    generator, so a sequence gets the same tokens alone or in any batch.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1
        ):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probabilities(self, logits: Tensor) -> Tensor:
        """The distribution a sampled token is drawn from, ``(..., V)`` in float32: temperature, top-k, top-p."""
        shape = logits.shape
        scores = logits.reshape(-1, shape[-1]).float() / self.temperature
        V = scores.shape[-1]
        if self.top_k is not None and self.top_k < V:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = scores.softmax(-1)
        if self.top_p is not None and self.top_p < 1.0:
            probs = _nucleus(probs, self.top_p, self.top_k)
        return probs.view(shape)


def _nucleus(probs: Tensor, top_p: float, top_k: int | None) -> Tensor:
    """``probs`` ``(N, V)`` kept on the smallest set of most likely tokens whose mass reaches ``top_p``,
    renormalised: a token is kept where the mass of those before it (in descending order) is below ``top_p``."""
    N, V = probs.shape
    keep = torch.zeros_like(probs, dtype=torch.bool)
    rows = torch.arange(N, device=probs.device)
    width = min(V, top_k or NUCLEUS_CANDIDATES)
    while len(rows):
        top = probs.index_select(0, rows).topk(width, dim=-1)  # sorted, most likely first
        inside = top.values.cumsum(-1) - top.values < top_p
        keep[rows] = keep.new_zeros(len(rows), V).scatter(-1, top.indices, inside)
        if width == V or (top_k is not None and width >= top_k):
            break
        rows = rows[inside[:, -1]]  # the nucleus may go on past the candidates: look wider
        width = min(V, 8 * width)
    kept = probs.masked_fill(~keep, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def generator_for(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own random stream: seeded, or from torch's global generator when no seed is given."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return torch.Generator(device=device).manual_seed(int(seed))


def uniforms(generators: list[torch.Generator], count: int, device: torch.device) -> Tensor:
    """``(len(generators), count)`` uniform numbers in [0, 1), row ``i`` from ``generators[i]``."""
    if not generators:
        return torch.zeros(0, count, device=device)
    return torch.stack([torch.rand(count, generator=g, device=device) for g in generators])


def draw(probs: Tensor, u: Tensor) -> Tensor:
    """One token per row of ``probs`` ``(N, V)`` (each row summing to its own total), by inverse transform
    with ``u`` ``(N,)`` uniform in [0, 1): the first token whose cumulative probability exceeds ``u`` times
    the total."""
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    # u * total can round up to the total: the last token with any probability then.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(token, last)
