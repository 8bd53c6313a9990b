import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lego_lightning import ExitTransformer, Stage, TransformerConfig
from lego_lightning.model import flops


def tiny(**kwargs):
    # D=8, H=2, F=32, V=11, L=2
    return TransformerConfig(vocab_size=11, n_layers=2, d_model=8, n_heads=2, d_ff=32, max_seq_len=16, **kwargs)


def test_layer_head_and_full_model_against_a_hand_count():
    cfg = tiny()
    c = flops.mean_context(4)  # causal, T=4: tokens attend to 1, 2, 3, 4 keys -> 2.5
    assert c == 2.5
    # matmul: qkv 2*8*24=384, scores and values 2*(2*8*2.5)=80, out 2*8*8=128, MLP 2*(2*8*32)=1024
    # elementwise: norms 2*7*8=112, biases 24+8+32+8=72, softmax 5*2*2.5=25, GELU 8*32=256, residual 16
    layer = flops.layer_flops(cfg, c)
    assert layer.matmul == 384 + 80 + 128 + 1024
    assert layer.elementwise == 112 + 72 + 25 + 256 + 16
    head = flops.head_flops(cfg)  # norm 7*8, projection 2*8*11
    assert (head.matmul, head.elementwise) == (176, 56)
    full = flops.full_flops(cfg, c)  # learned positions: one add per element
    assert full.total == 8 + 2 * (1616 + 481) + 232


def test_routed_mix_counts_every_head_confidence_and_propagated_keys():
    cfg = tiny(stages=[Stage((1, 1)), Stage((2, 2))])
    c = 2.5
    layer, head = 1616 + 481, 176 + 56
    conf = 6 * 11  # max_prob: softmax 5 per element + max 1 per element
    kv = (2 * 8 * 16) + (7 * 8 + 2 * 8)  # layer 2 still computes the early token's key and value
    leave_at_1 = 8 + layer + head + conf + kv
    leave_at_2 = 8 + 2 * layer + 2 * head + conf  # no confidence at the deepest exit
    fractions = {1: 0.6, 2: 0.4}
    routed = flops.routed_flops(cfg, fractions, c, "max_prob")
    assert routed.total == pytest.approx(0.6 * leave_at_1 + 0.4 * leave_at_2)
    full = 8 + 2 * layer + head
    assert flops.routed_flops_ratio(cfg, fractions, c, "max_prob") == pytest.approx(routed.total / full)
    assert flops.layers_only_ratio(cfg, fractions) == pytest.approx((0.6 * 1 + 0.4 * 2) / 2)
    without_kv = flops.routed_flops(cfg, fractions, c, "max_prob", kv_propagation=False)
    assert routed.total - without_kv.total == pytest.approx(0.6 * kv)


LLAMA_LIKE = {"n_kv_heads": 2, "norm": "rmsnorm", "activation": "swiglu", "qkv_bias": False, "bias": False}


@pytest.mark.parametrize(
    ("positions", "family"),
    [
        ("learned", {}),
        ("rotary", {}),
        ("rotary", LLAMA_LIKE),
        ("learned", {"n_kv_heads": 1}),
        ("rotary", {**LLAMA_LIKE, "head_dim": 6}),  # queries 4 x 6 = 24 wide on a 16-wide stream
    ],
)
def test_matmul_count_equals_torch_flop_counter(positions, family):
    # FlopCounterMode counts attention over the full T x T block, so compare a bidirectional model.
    cfg = TransformerConfig(
        vocab_size=50, n_layers=3, d_model=16, n_heads=4, max_seq_len=8, causal=False, positions=positions, **family
    )
    model = ExitTransformer(cfg).eval()
    B, T = 3, 8
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 50, (B, T)))
    ours = flops.full_flops(cfg, flops.mean_context(T, causal=False)).matmul * B * T
    assert counter.get_total_flops() == ours


def test_research_ashem_routing_costs_more_than_the_full_model_once_heads_count():
    # SEEDS.md section 2: 72% of tokens leave at layer 2 of 4, reported as 63.98% of the compute.
    cfg = TransformerConfig(
        vocab_size=69_830,
        n_layers=4,
        d_model=64,
        n_heads=4,
        max_seq_len=32,
        stages=[Stage((1, 2)), Stage((3, 4))],
    )
    fractions = {2: 0.7201, 4: 0.2799}
    assert flops.layers_only_ratio(cfg, fractions) == pytest.approx(0.6400, abs=1e-3)
    assert flops.routed_flops_ratio(cfg, fractions, flops.mean_context(32), "max_prob") > 1.2


def test_fractions_must_name_exits_and_sum_to_one():
    cfg = tiny(stages=[Stage((1, 1)), Stage((2, 2))])
    with pytest.raises(ValueError, match="not exits"):
        flops.routed_flops(cfg, {3: 1.0}, 2.0, "max_prob")
    with pytest.raises(ValueError, match="must sum to 1"):
        flops.layers_only_ratio(cfg, {1: 0.5, 2: 0.4})


def test_training_flops_against_a_hand_count():
    cfg = tiny(stages=[Stage((1, 1)), Stage((2, 2))])
    c = 2.5
    layer_mm, layer_ew = 1616, 481
    layer = layer_mm + layer_ew
    head = 176 + 56
    ce = 6 * 11  # softmax (5 per element) and the picked log-probability
    # Both exits trained, nothing frozen: forward 2 layers + 2 heads; backward 2x layers and heads, embedding rows.
    both = flops.training_flops_per_token(cfg, [0.5, 0.5], c)
    assert both.total == pytest.approx((8 + 2 * layer + 2 * (head + ce)) + (2 * 2 * layer + 2 * (ce + 2 * head) + 8))
    # Only exit 1 trained: layer 2 does not run at all.
    shallow = flops.training_flops_per_token(cfg, [1.0, 0.0], c)
    assert shallow.total == pytest.approx((8 + layer + head + ce) + (2 * layer + ce + 2 * head + 8))
    # ASHEM's phase 2: layer 1, embedding and exit 1 frozen, exit 2 trained: no backward below layer 2.
    phase2 = flops.training_flops_per_token(cfg, [0.0, 1.0], c, frozen_layers=1, frozen_heads=[0])
    assert phase2.total == pytest.approx((8 + 2 * layer + head + ce) + (2 * layer + ce + 2 * head))
    # Draft-only distillation: exit 1's head alone trains, toward exit 2, whose layer, head and softmax run forward.
    draft = flops.training_flops_per_token(cfg, [1.0, 0.0], c, frozen_layers=2, frozen_heads=[1], teacher=2)
    assert draft.total == pytest.approx((8 + layer + head + ce) + (layer + head + ce) + (ce + 2 * head))
    # Mining by disagreement: both layers, both heads and both softmaxes, per training token.
    assert flops.agreement_flops_per_token(cfg, 1, 2, c).total == pytest.approx(8 + 2 * layer + 2 * (head + 5 * 11))
    with pytest.raises(ValueError, match="got 1 loss weights for 2 exits"):
        flops.training_flops_per_token(cfg, [1.0], c)
