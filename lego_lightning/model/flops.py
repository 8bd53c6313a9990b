"""FLOPs per token of everything that runs: layers, attention over the context, every head, confidence.

The research notes counted layers only (SEEDS.md, "what the notes got wrong" 1); at d_model 64
and a 33K vocabulary one head costs more than all layers together. Here every exit's cost
includes the heads and confidence measures a token passes through, and a token that leaves
early still pays for the keys and values deeper layers need at its position (state
propagation), unless ``kv_propagation=False``.

Conventions: a multiply-add is 2 FLOPs; biases, norms, activations, softmax and residual adds
are counted per element with the constants below. ``FlopCount.matmul`` holds the matrix
products alone, which ``torch.utils.flop_counter.FlopCounterMode`` can check independently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lego_lightning.model.confidence import SOFTMAX_FLOPS_PER_ELEMENT, get_confidence
from lego_lightning.model.config import TransformerConfig

NORM_FLOPS_PER_ELEMENT = 7  # layer norm: mean, centre, square, sum, normalise, scale, shift
RMSNORM_FLOPS_PER_ELEMENT = 4  # square, sum, normalise, scale
GELU_FLOPS_PER_ELEMENT = 8  # erf-based GELU, an estimate (its tanh form alike)
SWIGLU_FLOPS_PER_ELEMENT = 5  # SiLU (an estimate, 4) and the product with the up projection
ROTARY_FLOPS_PER_ELEMENT = 3  # two multiplies and an add per rotated element


def norm_flops(cfg: TransformerConfig) -> float:
    """One norm over one token's ``d_model`` elements."""
    per_element = RMSNORM_FLOPS_PER_ELEMENT if cfg.norm == "rmsnorm" else NORM_FLOPS_PER_ELEMENT
    return per_element * cfg.d_model


@dataclass(frozen=True)
class FlopCount:
    """FLOPs split into matrix products and element-wise work."""

    matmul: float = 0.0
    elementwise: float = 0.0

    @property
    def total(self) -> float:
        return self.matmul + self.elementwise

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(self.matmul + other.matmul, self.elementwise + other.elementwise)

    def __mul__(self, k: float) -> FlopCount:
        return FlopCount(self.matmul * k, self.elementwise * k)

    __rmul__ = __mul__


def mean_context(seq_len: int, causal: bool = True) -> float:
    """Mean number of keys a token attends to in a block of ``seq_len`` tokens."""
    return (seq_len + 1) / 2 if causal else float(seq_len)


def embedding_flops(cfg: TransformerConfig) -> FlopCount:
    """The lookup is free; a learned position embedding is one add per element."""
    return FlopCount(elementwise=cfg.d_model if cfg.positions == "learned" else 0.0)


def layer_flops(cfg: TransformerConfig, context: float) -> FlopCount:
    """One layer for one token attending to ``context`` keys."""
    D, F, H = cfg.d_model, cfg.d_ff, cfg.n_heads
    assert F is not None and cfg.n_kv_heads is not None and cfg.head_dim is not None
    Q = cfg.attention_width  # query width: D unless head_dim says otherwise
    KV = cfg.n_kv_heads * cfg.head_dim  # key (and value) width: below Q with grouped-query attention
    mlp_in = 2 * F if cfg.activation == "swiglu" else F  # SwiGLU: gate and up projections
    matmul = (
        2 * D * (Q + 2 * KV)  # q, k, v projections
        + 2 * Q * context  # q . k over the context, all heads together
        + 2 * Q * context  # attention-weighted sum of values
        + 2 * Q * D  # output projection
        + 2 * D * mlp_in
        + 2 * F * D  # MLP in and out
    )
    activation = SWIGLU_FLOPS_PER_ELEMENT if cfg.activation == "swiglu" else GELU_FLOPS_PER_ELEMENT
    elementwise = (
        2 * norm_flops(cfg)
        + ((Q + 2 * KV) if cfg.qkv_bias else 0)
        + ((D + mlp_in + D) if cfg.bias else 0)  # biases: out projection, MLP in, MLP out
        + SOFTMAX_FLOPS_PER_ELEMENT * H * context  # attention softmax
        + activation * F
        + 2 * D  # two residual adds
        + (ROTARY_FLOPS_PER_ELEMENT * (Q + KV) if cfg.positions == "rotary" else 0)  # queries and keys
    )
    return FlopCount(matmul, elementwise)


def kv_flops(cfg: TransformerConfig) -> FlopCount:
    """What a deeper layer spends on a token that already left: its norm, key and value."""
    assert cfg.n_kv_heads is not None and cfg.head_dim is not None
    D, KV = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    return FlopCount(
        matmul=2 * D * 2 * KV,
        elementwise=norm_flops(cfg)
        + (2 * KV if cfg.qkv_bias else 0)
        + (ROTARY_FLOPS_PER_ELEMENT * KV if cfg.positions == "rotary" else 0),
    )


def head_flops(cfg: TransformerConfig) -> FlopCount:
    """One exit head: norm and projection to the vocabulary."""
    return FlopCount(matmul=2 * cfg.d_model * cfg.vocab_size, elementwise=norm_flops(cfg))


def confidence_flops(cfg: TransformerConfig, confidence: str) -> FlopCount:
    """The named confidence measure over one exit's logits."""
    return FlopCount(elementwise=get_confidence(confidence).flops_per_token(cfg.vocab_size, cfg.d_model))


def single_exit_flops(cfg: TransformerConfig, exit_layer: int, context: float) -> FlopCount:
    """Run layers ``1..exit_layer`` and that exit's head, nothing else (a model truncated there)."""
    return embedding_flops(cfg) + exit_layer * layer_flops(cfg, context) + head_flops(cfg)


def full_flops(cfg: TransformerConfig, context: float) -> FlopCount:
    """The reference for every ratio: all layers and the deepest head, no confidence."""
    return single_exit_flops(cfg, cfg.n_layers, context)


def routed_exit_flops(
    cfg: TransformerConfig, exit_layer: int, context: float, confidence: str, kv_propagation: bool = True
) -> FlopCount:
    """A token that leaves at ``exit_layer`` of a routed model.

    It ran every layer up to its exit, and at every exit it reached the confidence measure
    (except at the deepest exit, where no decision is left to make). A measure computed from
    logits needs the head at every exit reached; one that reads the hidden state (a learned exit
    classifier) needs the head only where the token leaves. Deeper layers still compute its key
    and value when ``kv_propagation`` is on.
    """
    exits = [e for e in cfg.exit_layers if e <= exit_layer]
    if not exits or exits[-1] != exit_layer:
        raise ValueError(f"exit_layer={exit_layer} is not an exit; exits are after layers {cfg.exit_layers}")
    n_confidences = len(exits) - (1 if exit_layer == cfg.n_layers else 0)
    n_heads = 1 if get_confidence(confidence).reads_hidden else len(exits)
    cost = embedding_flops(cfg) + exit_layer * layer_flops(cfg, context) + n_heads * head_flops(cfg)
    cost = cost + n_confidences * confidence_flops(cfg, confidence)
    if kv_propagation:
        cost = cost + (cfg.n_layers - exit_layer) * kv_flops(cfg)
    return cost


def _check_fractions(cfg: TransformerConfig, fractions: Mapping[int, float]) -> None:
    unknown = set(fractions) - set(cfg.exit_layers)
    if unknown:
        raise ValueError(f"exit fractions name layers {sorted(unknown)} that are not exits {cfg.exit_layers}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-4:
        raise ValueError(f"exit fractions must sum to 1, got {total} from {dict(fractions)}")


def routed_flops(
    cfg: TransformerConfig,
    fractions: Mapping[int, float],
    context: float,
    confidence: str,
    kv_propagation: bool = True,
) -> FlopCount:
    """Mean FLOPs per token of a routed model where ``fractions[e]`` of tokens leave at exit ``e``."""
    _check_fractions(cfg, fractions)
    total = FlopCount()
    for exit_layer, frac in fractions.items():
        total = total + frac * routed_exit_flops(cfg, exit_layer, context, confidence, kv_propagation)
    return total


def routed_flops_ratio(
    cfg: TransformerConfig,
    fractions: Mapping[int, float],
    context: float,
    confidence: str,
    kv_propagation: bool = True,
) -> float:
    """Routed FLOPs over the full model's FLOPs, everything that runs counted."""
    routed = routed_flops(cfg, fractions, context, confidence, kv_propagation)
    return routed.total / full_flops(cfg, context).total


def layers_only_ratio(cfg: TransformerConfig, fractions: Mapping[int, float]) -> float:
    """The research notes' measure: mean number of layers run over the total, heads ignored."""
    _check_fractions(cfg, fractions)
    return sum(frac * exit_layer for exit_layer, frac in fractions.items()) / cfg.n_layers


def training_flops_per_token(
    cfg: TransformerConfig,
    loss_weights: Sequence[float],
    context: float,
    frozen_layers: int = 0,
    frozen_heads: Sequence[int] = (),
    teacher: int | None = None,
) -> FlopCount:
    """One training step's FLOPs per token: forward, backward and the loss, for everything that runs.

    Forward runs the layers up to the deepest exit with a non-zero weight and the head and
    cross-entropy of every weighted exit. Backward costs twice a part's forward (gradients of
    inputs and of weights) for trainable layers and heads, and once (inputs only) for a frozen
    head whose loss still reaches trainable layers below it. The first ``frozen_layers`` layers
    (and the embedding with them) get no backward at all: nothing below them needs a gradient.
    ``frozen_heads`` are stage positions of heads that do not train. ``teacher``: the layer of
    the exit that weighted exits distil toward (``Phase.distill``); the layers up to it and its
    head and softmax run forward too, without backward.
    """
    if len(loss_weights) != len(cfg.stages):
        raise ValueError(f"got {len(loss_weights)} loss weights for {len(cfg.stages)} exits {cfg.exit_layers}")
    trained = [i for i, w in enumerate(loss_weights) if w > 0]
    deepest = cfg.exit_layers[trained[-1]]
    layer = layer_flops(cfg, context)
    head = head_flops(cfg)
    cross_entropy = FlopCount(elementwise=(SOFTMAX_FLOPS_PER_ELEMENT + 1) * cfg.vocab_size)
    forward = embedding_flops(cfg) + deepest * layer + len(trained) * (head + cross_entropy)
    if teacher is not None:
        forward = forward + max(0, teacher - deepest) * layer + head + cross_entropy
    backward = 2 * max(0, deepest - frozen_layers) * layer
    for i in trained:
        backward = backward + cross_entropy
        if i not in frozen_heads:
            backward = backward + 2 * head
        elif cfg.exit_layers[i] > frozen_layers:
            backward = backward + head
    if frozen_layers == 0:
        backward = backward + FlopCount(elementwise=cfg.d_model)  # embedding gradient rows
    return forward + backward


def agreement_flops_per_token(cfg: TransformerConfig, exit_layer: int, other: int, context: float) -> FlopCount:
    """Comparing two exits' tokens (mining by disagreement): the layers to the deeper, both heads and softmaxes."""
    softmax = FlopCount(elementwise=SOFTMAX_FLOPS_PER_ELEMENT * cfg.vocab_size)
    return embedding_flops(cfg) + max(exit_layer, other) * layer_flops(cfg, context) + 2 * (head_flops(cfg) + softmax)


def inference_flops_per_token(cfg: TransformerConfig, exit_layer: int, context: float, confidence: str) -> FlopCount:
    """Scoring tokens at one exit with a confidence measure (threshold calibration, hard-example mining)."""
    return single_exit_flops(cfg, exit_layer, context) + confidence_flops(cfg, confidence)
