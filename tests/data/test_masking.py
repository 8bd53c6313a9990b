import torch

from lego_lightning.data.masking import mask_tokens


def test_rate_and_the_80_10_10_split():
    tokens = torch.randint(10, 1000, (400, 256), generator=torch.Generator().manual_seed(0))
    inputs, targets = mask_tokens(tokens, mask_id=1000, vocab_size=1000, generator=torch.Generator().manual_seed(1))
    chosen = targets != -100
    n = chosen.sum().item()
    assert abs(n / tokens.numel() - 0.15) < 0.005
    assert torch.equal(targets[chosen], tokens[chosen])  # targets are the original tokens
    masked = (inputs == 1000) & chosen
    kept = (inputs == tokens) & chosen
    replaced = chosen & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    # A random replacement can draw the original token (1 in 1000): "kept" holds 10% plus those.
    assert abs(kept.sum().item() / n - 0.1) < 0.01 and abs(replaced.sum().item() / n - 0.1) < 0.01
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # nothing outside the chosen positions changes
    assert (inputs[replaced] < 1000).all()


def test_a_generator_fixes_the_positions():
    tokens = torch.randint(0, 50, (4, 32))
    a = mask_tokens(tokens, 50, 50, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(tokens, 50, 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
