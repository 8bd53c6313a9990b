import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lego_lightning import ExitTransformer, Stage, TransformerConfig
from lego_lightning.decoding import generate
from lego_lightning.model.early_exit import routed_forward

V = 40


# "llama": the Llama family's layer (grouped-query attention, RMSNorm, SwiGLU, no biases) with rotary positions.
LLAMA = {"positions": "rotary", "n_kv_heads": 1, "norm": "rmsnorm", "activation": "swiglu", "qkv_bias": False,
         "bias": False}  # fmt: skip


def model_for(seed, positions="learned", head_sharing="separate", stages=None, causal=True):
    torch.manual_seed(seed)
    stages = stages or [Stage((1, 1)), Stage((2, 3)), Stage((4, 4))]
    layer = LLAMA if positions == "llama" else {"positions": positions}
    cfg = TransformerConfig(vocab_size=V, n_layers=4, d_model=16, n_heads=2, max_seq_len=24, head_sharing=head_sharing,
                            stages=stages, causal=causal, **layer)  # fmt: skip
    return ExitTransformer(cfg).eval()


def assert_batch_routes_like_each_row_alone(model, idx, threshold):
    batched = routed_forward(model, idx, threshold)
    assert len(batched.exit_position.unique()) > 1  # a real mix of depths
    assert (batched.exit_position != batched.exit_position[0, 0]).any(dim=1).any()
    for row in range(len(idx)):
        alone = routed_forward(model, idx[row : row + 1], threshold)
        assert torch.equal(alone.exit_position, batched.exit_position[row : row + 1])
        assert_close(alone.logits, batched.logits[row : row + 1])


CASES = [
    (seed, pos, heads)
    for seed in (0, 1, 2)
    for pos in ("learned", "rotary", "llama")
    for heads in ("shared", "separate")
]


@pytest.mark.parametrize(("seed", "positions", "heads"), CASES)
def test_threshold_one_is_the_full_model_and_zero_the_first_exit(seed, positions, heads):
    model = model_for(seed, positions, heads)
    idx = torch.randint(0, V, (3, 20))
    full = model(idx)
    everyone_stays = routed_forward(model, idx, 1.0)
    assert (everyone_stays.exit_position == 2).all()
    assert_close(everyone_stays.logits, full[4])
    everyone_leaves = routed_forward(model, idx, 0.0)
    assert (everyone_leaves.exit_position == 0).all()
    assert_close(everyone_leaves.logits, full[1])


@pytest.mark.parametrize(("seed", "positions", "heads"), CASES)
@pytest.mark.parametrize("leaving", [0.25, 0.75])  # most continue (all positions attend) or few (packed queries)
def test_rows_leaving_at_different_depths_match_each_row_alone(seed, positions, heads, leaving):
    model = model_for(seed, positions, heads)
    idx = torch.randint(0, V, (4, 20))
    conf = torch.softmax(model(idx)[1], -1).amax(-1)
    threshold = conf.quantile(1 - leaving).item()
    assert_batch_routes_like_each_row_alone(model, idx, threshold)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_model_that_attends_both_ways_routes_like_each_row_alone(seed):
    model = model_for(seed, causal=False)
    idx = torch.randint(0, V, (3, 16))
    assert_close(routed_forward(model, idx, 1.0).logits, model(idx)[4])
    threshold = torch.softmax(model(idx)[1], -1).amax(-1).median().item()
    assert_batch_routes_like_each_row_alone(model, idx, threshold)


@pytest.mark.parametrize("leaving", [0.25, 0.75])
def test_routed_scoring_runs_under_bf16_autocast_and_matches_float32(leaving):
    model = model_for(0, "rotary", stages=[Stage((1, 2)), Stage((3, 4))])
    idx, targets = torch.randint(0, V, (3, 20)), torch.randint(0, V, (3, 20))
    leave = torch.rand(60, generator=torch.Generator().manual_seed(1)) < leaving

    def fixed(exit_layer, h):  # the same tokens leave in both precisions: row-major order at the only early exit
        return leave.float()

    full = routed_forward(model, idx, 0.5, targets=targets, hidden_confidence=fixed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = routed_forward(model, idx, 0.5, targets=targets, hidden_confidence=fixed)
    assert torch.equal(half.exit_position, full.exit_position)
    assert torch.equal(full.exit_position.flatten() == 0, leave)
    assert_close(half.nll, full.nll, rtol=0.05, atol=0.05)


def test_scores_are_the_cross_entropy_of_the_routed_logits():
    model = model_for(0)
    idx, targets = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
    threshold = torch.softmax(model(idx)[1], -1).amax(-1).median().item()
    with_logits = routed_forward(model, idx, threshold)
    with_targets = routed_forward(model, idx, threshold, targets=targets)
    expected = F.cross_entropy(with_logits.logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 16)
    assert_close(with_targets.nll, expected)


def test_tokens_that_left_give_only_keys_and_values_to_deeper_layers():
    model = model_for(0)
    idx = torch.randint(0, V, (2, 12))
    calls = []
    model.blocks[3].mlp.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    threshold = torch.softmax(model(idx)[1], -1).amax(-1).quantile(0.25).item()
    calls.clear()
    routed = routed_forward(model, idx, threshold)
    continuing = int((routed.exit_position == 2).sum())
    # Layer 4's MLP ran once, on the continuing tokens of both rows packed flat: no padding where rows differ.
    assert calls == [continuing] and continuing < 24


def test_a_hidden_state_confidence_runs_no_head_for_tokens_that_continue():
    model = model_for(1)
    idx = torch.randint(0, V, (2, 12))
    runs = []
    model.heads[0].register_forward_hook(lambda m, a, o: runs.append(a[0].shape[0]))

    def by_norm(exit_layer, h):  # a stand-in for a trained exit classifier: confidence from the state alone
        return torch.sigmoid(h.norm(dim=-1) - h.norm(dim=-1).median())

    routed = routed_forward(model, idx, 0.5, hidden_confidence=by_norm)
    left_first = int((routed.exit_position == 0).sum())
    assert runs == [left_first] and 0 < left_first < 24


def naive_greedy(model, prompt, n, exit_layer):
    tokens = prompt
    for _ in range(n):
        logits = model(tokens, [exit_layer])[exit_layer][:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("positions", ["learned", "rotary", "llama"])
def test_generation_with_routing_off_is_plain_greedy_decoding_without_a_cache(seed, positions):
    model = model_for(seed, positions)
    prompt = torch.randint(0, V, (3, 5))
    assert torch.equal(generate(model, prompt, 12).tokens, naive_greedy(model, prompt, 12, 4))
    assert torch.equal(generate(model, prompt, 12, threshold=1.0).tokens, naive_greedy(model, prompt, 12, 4))
    leaving_first = generate(model, prompt, 12, threshold=0.0)
    assert (leaving_first.exit_position == 0).all()
    assert torch.equal(leaving_first.tokens, naive_greedy(model, prompt, 12, 1))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("positions", ["rotary", "llama"])
def test_batched_generation_with_mixed_exits_matches_each_sequence_alone(seed, positions):
    model = model_for(seed, positions)
    prompt = torch.randint(0, V, (4, 4))
    threshold = torch.softmax(model(prompt)[1], -1).amax(-1).median().item()
    batched = generate(model, prompt, 10, threshold=threshold)
    assert len(batched.exit_position.unique()) > 1
    for row in range(4):
        alone = generate(model, prompt[row : row + 1], 10, threshold=threshold)
        assert torch.equal(alone.tokens, batched.tokens[row : row + 1])
        assert torch.equal(alone.exit_position, batched.exit_position[row : row + 1])


def test_generation_checks_its_input():
    model = model_for(0)
    with pytest.raises(ValueError, match="exceeds max_seq_len=24"):
        generate(model, torch.zeros(1, 20, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="threshold must be in"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2, threshold=2.0)
