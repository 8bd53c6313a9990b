"""How a token is chosen from an exit's logits, and each request's own random stream.

Greedy takes the argmax. Sampling divides the logits by the temperature, keeps the ``top_k``
most likely tokens and the smallest set whose probability reaches ``top_p`` (the nucleus), and
draws by inverse transform: one uniform number from the request's own generator, looked up in
the cumulative distribution. Every draw of a request comes from its own generator in an order
fixed by its own history, so it gets the same tokens alone or beside any other request.

The nucleus is found without sorting the vocabulary: probabilities fall into fine buckets of
log-probability below the most likely token; the buckets' masses say which bucket holds the
nucleus' edge, and only that bucket's few tokens are sorted. At a vocabulary of 8K, sorting every
position of a verification cost as much as the verification's layers; this costs a tenth of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The nucleus' buckets: this many, each SPAN / BUCKETS nats of log-probability wide, below the most
# likely token; what lies further below shares the last one.
BUCKETS, SPAN = 1024, 30.0


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
        scores = logits.reshape(-1, shape[-1]).float() * (1.0 / self.temperature)
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = scores.softmax(-1)
        if self.top_p is not None and self.top_p < 1.0:
            probs = nucleus(probs, self.top_p, scores)
        return probs.view(shape)


def nucleus(probs: Tensor, top_p: float, scores: Tensor | None = None) -> Tensor:
    """``probs`` ``(N, V)`` kept on the smallest set of most likely tokens whose mass reaches ``top_p``,
    renormalised: a token is kept where the mass of those before it (in descending order) is below ``top_p``.
    ``scores``: the logits whose softmax ``probs`` is (they differ from the log-probabilities by a constant)."""
    log_p = probs.log() if scores is None else scores
    bucket = ((log_p.amax(-1, keepdim=True) - log_p) * (BUCKETS / SPAN)).clamp_(max=BUCKETS - 1).long()
    mass = probs.new_zeros(len(probs), BUCKETS).scatter_add_(1, bucket, probs)
    before = mass.cumsum(1) - mass  # the mass of the more likely buckets
    # Tokens of buckets above the edge are in (the mass before them is under top_p), those below are out.
    edge = ((before < top_p).sum(1, keepdim=True) - 1).clamp_(min=0)
    keep = bucket < edge
    in_edge = bucket == edge
    edge_tokens = torch.where(in_edge, probs, -1.0).topk(int(in_edge.sum(1).max()), dim=-1)  # its tokens, sorted
    inside = before.gather(1, edge) + edge_tokens.values.cumsum(1) - edge_tokens.values < top_p
    inside &= edge_tokens.values >= 0  # rows with fewer tokens in their edge bucket: the rest is filler
    keep.scatter_(1, edge_tokens.indices, inside | keep.gather(1, edge_tokens.indices))
    kept = torch.where(keep, probs, 0.0)
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
    the total (a float product of a number below 1 never rounds up to the total, so that token has probability)."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u.unsqueeze(-1) * cdf[:, -1:], right=True).squeeze(-1)
