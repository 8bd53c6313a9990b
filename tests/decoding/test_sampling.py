"""Sampling's pieces against their definitions: the nucleus against a sort of the vocabulary, draws against p."""

import pytest
import torch

from lego_lightning.decoding.sampling import Sampling, draw, nucleus


def sorted_nucleus(probs, top_p):
    """The definition: sort, keep a token where the mass before it is below top_p, renormalise."""
    ordered, order = probs.sort(-1, descending=True)
    outside = ordered.cumsum(-1) - ordered >= top_p
    kept = probs.scatter(-1, order, ordered.masked_fill(outside, 0.0))
    return kept / kept.sum(-1, keepdim=True)


def distributions():
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 3.0, 8.0, 40.0):  # near uniform to one token holding almost all the mass
        yield (torch.randn(16, 3000, generator=g) * scale).softmax(-1)
    top3 = (torch.randn(4, 500, generator=g) * 2).softmax(-1)
    top3[:, 3:] = 0.0  # top-k left three tokens
    yield top3 / top3.sum(-1, keepdim=True)
    spread = torch.cat([torch.zeros(2, 1), torch.linspace(-80, -1, 999).expand(2, -1)], 1).softmax(-1)
    yield spread  # tokens far below the top (past the buckets' span) and one that holds nearly everything


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 0.95, 0.999])
def test_the_nucleus_is_the_sorted_definitions_set(top_p):
    for probs in distributions():
        torch.testing.assert_close(nucleus(probs, top_p), sorted_nucleus(probs, top_p))
        assert torch.equal(nucleus(probs, top_p) > 0, sorted_nucleus(probs, top_p) > 0)


def test_with_ties_the_nucleus_keeps_as_many_tokens_and_as_much_mass():
    flat = torch.full((3, 400), 1 / 400)  # every order of equal tokens is a sort's order
    for top_p in (0.1, 0.5, 0.95):
        ours, theirs = nucleus(flat, top_p), sorted_nucleus(flat, top_p)
        assert torch.equal((ours > 0).sum(-1), (theirs > 0).sum(-1))
        torch.testing.assert_close(ours.sum(-1), theirs.sum(-1))


def test_sampling_probabilities_apply_temperature_top_k_and_top_p_in_that_order():
    logits = torch.randn(5, 200, generator=torch.Generator().manual_seed(1)) * 3
    got = Sampling(temperature=0.7, top_k=20, top_p=0.8).probabilities(logits)
    scores = logits / 0.7
    kth = scores.topk(20, -1).values[:, -1:]
    expected = sorted_nucleus(scores.masked_fill(scores < kth, float("-inf")).softmax(-1), 0.8)
    torch.testing.assert_close(got, expected)
    assert ((got > 0).sum(-1) <= 20).all() and ((got > 0).sum(-1) >= 1).all()


def test_a_draw_takes_each_token_in_proportion_to_its_probability():
    probs = torch.tensor([[0.5, 0.0, 0.25, 0.125, 0.125], [0.0, 0.0, 2.0, 1.0, 0.0]])  # the second unnormalised
    u = (torch.arange(3000) + 0.5) / 3000  # evenly spread: the counts are the probabilities times 3000
    counts = [torch.bincount(draw(row.expand(3000, -1), u), minlength=5) for row in probs]
    assert counts[0].tolist() == [1500, 0, 750, 375, 375]
    assert counts[1].tolist() == [0, 0, 2000, 1000, 0]
    # The largest uniform below 1: the last token that has probability, never one past it.
    almost_one = torch.tensor([1 - 2**-24, 1 - 2**-24])
    assert draw(probs, almost_one).tolist() == [4, 3]
