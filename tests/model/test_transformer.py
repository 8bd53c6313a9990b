import pytest
import torch
from torch.testing import assert_close

from lego_lightning import ExitTransformer, Stage, TransformerConfig


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    defaults = dict(vocab_size=37, n_layers=3, d_model=16, n_heads=2, max_seq_len=12)
    return ExitTransformer(TransformerConfig(**{**defaults, **kwargs})).eval()


@pytest.mark.parametrize("head_sharing", ["shared", "separate"])
def test_logits_at_every_exit_have_vocab_shape(head_sharing):
    model = make(stages=[Stage((1, 1)), Stage((2, 3))], head_sharing=head_sharing)
    out = model(torch.randint(0, 37, (4, 10)))
    assert sorted(out) == [1, 3]
    assert all(v.shape == (4, 10, 37) for v in out.values())
    assert len(model.heads) == (1 if head_sharing == "shared" else 2)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_mask_future_tokens_do_not_change_past_logits(positions):
    model = make(positions=positions)
    x = torch.randint(0, 37, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 37
    a, b = model(x)[3], model(y)[3]
    assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_bidirectional_model_sees_the_future():
    model = make(causal=False)
    x = torch.randint(0, 37, (2, 10))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 37
    assert not torch.allclose(model(x)[3][:, 0], model(y)[3][:, 0])


def test_rotary_positions_make_order_matter():
    model = make(positions="rotary")
    x = torch.randint(0, 37, (1, 8))
    assert not torch.allclose(model(x)[3][:, -1], model(x.flip(1))[3][:, -1])


def test_hidden_states_runs_only_layers_up_to_the_deepest_requested_exit():
    model = make(stages=[Stage((1, 1)), Stage((2, 2)), Stage((3, 3))])
    ran = []
    for i, block in enumerate(model.blocks, start=1):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    out = model.hidden_states(torch.randint(0, 37, (1, 5)), [1])
    assert list(out) == [1] and ran == [1]
    with pytest.raises(ValueError, match=r"exit_layer=2 is not an exit|not an exit"):
        make().hidden_states(torch.randint(0, 37, (1, 5)), [2])


def test_sequence_longer_than_context_is_a_clear_error():
    with pytest.raises(ValueError, match=r"sequence length 13 is larger than the model's context max_seq_len=12"):
        make()(torch.randint(0, 37, (1, 13)))


def test_tied_embeddings_share_one_tensor_with_every_head():
    model = make(tie_embeddings=True, head_sharing="separate", stages=[Stage((1, 1)), Stage((2, 3))])
    assert all(h.proj.weight is model.tok_emb.weight for h in model.heads)
    model.grow(1)
    assert model.heads[-1].proj.weight is model.tok_emb.weight


def test_exit_heads_own_their_projection_when_only_the_last_is_tied():
    model = make(
        tie_embeddings=True, tie_exit_heads=False, head_sharing="separate", stages=[Stage((1, 1)), Stage((2, 3))]
    )
    first, last = model.heads
    assert last.proj.weight is model.tok_emb.weight and first.proj.weight is not model.tok_emb.weight
    untied = make(head_sharing="separate", stages=[Stage((1, 1)), Stage((2, 3))])
    assert len(list(model.parameters())) == len(list(untied.parameters())) - 1  # one projection fewer
    model.grow(1)  # the head that was last keeps its values, now a projection of its own
    assert model.heads[-1].proj.weight is model.tok_emb.weight
    assert model.heads[1].proj.weight is not model.tok_emb.weight
    assert torch.equal(model.heads[1].proj.weight, model.tok_emb.weight)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("head_sharing", ["shared", "separate"])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_identity_grow_keeps_every_output(seed, head_sharing, positions):
    model = make(seed, head_sharing=head_sharing, positions=positions, stages=[Stage((1, 1)), Stage((2, 3))])
    x = torch.randint(0, 37, (3, 12))
    before = model(x)
    stage = model.grow(2, init="identity")
    after = model(x)
    assert stage.layers == (4, 5) and model.config.exit_layers == (1, 3, 5) and len(model.blocks) == 5
    assert_close(after[1], before[1])
    assert_close(after[3], before[3])
    assert_close(after[5], before[3])


def test_identity_grow_still_trains_the_new_layers():
    model = make().train()
    model.grow(1, init="identity")
    x = torch.randint(0, 37, (2, 8))
    model(x)[4].logsumexp(-1).mean().backward()
    attn_out, mlp_out = model.blocks[3].residual_projections()
    assert attn_out.weight.grad is not None and attn_out.weight.grad.abs().sum() > 0
    assert mlp_out.weight.grad.abs().sum() > 0


def test_copy_grow_repeats_the_top_of_the_stack():
    model = make(n_layers=2)
    model.grow(3, init="copy")
    sd = model.state_dict()
    # n=3 > L=2: new layer j copies layer ((L - n + j) mod L) + 1 -> 2, 1, 2
    for new, src in ((3, 2), (4, 1), (5, 2)):
        assert_close(sd[f"blocks.{new - 1}.mlp.fc.weight"], sd[f"blocks.{src - 1}.mlp.fc.weight"])
    assert model.blocks[2].mlp.fc.weight is not model.blocks[1].mlp.fc.weight


def test_random_grow_changes_the_deepest_output():
    model = make()
    x = torch.randint(0, 37, (2, 8))
    before = model(x)[3]
    model.grow(1, init="random")
    assert not torch.allclose(model(x)[4], before)


@pytest.mark.parametrize(("n", "init", "message"), [(0, "identity", "positive integer"), (1, "zeros", "init='zeros'")])
def test_bad_grow_arguments(n, init, message):
    with pytest.raises(ValueError, match=message):
        make().grow(n, init=init)


def test_stage_parameters_follow_the_stage_layout():
    model = make(head_sharing="separate", stages=[Stage((1, 1)), Stage((2, 3))])
    stage_of = {name: stage for stage, name, _ in model.named_stage_parameters()}
    assert stage_of["tok_emb.weight"] == 0
    assert stage_of["blocks.0.attn.qkv.weight"] == 0
    assert stage_of["blocks.1.attn.qkv.weight"] == 1 and stage_of["blocks.2.mlp.fc.bias"] == 1
    assert stage_of["heads.0.proj.weight"] == 0 and stage_of["heads.1.proj.weight"] == 1
    n_params = sum(1 for _ in model.parameters())
    assert len(stage_of) == n_params
