"""Validated configuration of an exit transformer: its sizes and its stages (the "LEGO blocks").

Layers are numbered from 1, as in the research notes. Every error names the field, the value
given and what is allowed, and is raised when the config is built, before any training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

Positions = Literal["learned", "rotary"]
HeadSharing = Literal["shared", "separate"]
Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "gelu_tanh", "swiglu"]
POSITIONS: tuple[str, ...] = get_args(Positions)
HEAD_SHARING: tuple[str, ...] = get_args(HeadSharing)
NORMS: tuple[str, ...] = get_args(Norm)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
# Rotary scalings, with the keys each needs beside rope_type and factor (Hugging Face's names).
ROPE_SCALINGS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def is_int(value: Any) -> bool:
    """An integer that is not a bool (YAML's ``true`` is not a layer number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Stage:
    """A contiguous range of layers that ends in an exit.

    Args:
        layers: ``(first, last)``, 1-based and inclusive.
        loss_weight: weight of this exit's loss in training; 0 means no head runs for it in training.
        lr_scale: multiplies the base learning rate for this stage's parameters (discriminative rates).
        trainable: ``False`` freezes the stage's layers and its own exit head.
    """

    layers: tuple[int, int]
    loss_weight: float = 1.0
    lr_scale: float = 1.0
    trainable: bool = True

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if len(layers) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
            raise ValueError(f"Stage.layers must be two integers (first, last), got {self.layers!r}")
        first, last = layers
        if first < 1 or last < first:
            raise ValueError(f"Stage.layers must satisfy 1 <= first <= last, got {layers}")
        object.__setattr__(self, "layers", layers)
        if not math.isfinite(self.loss_weight) or self.loss_weight < 0:
            raise ValueError(
                f"Stage.loss_weight must be a finite number >= 0, got {self.loss_weight} for layers {layers}"
            )
        if not math.isfinite(self.lr_scale) or self.lr_scale <= 0:
            raise ValueError(f"Stage.lr_scale must be a finite number > 0, got {self.lr_scale} for layers {layers}")

    @property
    def exit_layer(self) -> int:
        """The 1-based layer after which this stage's exit reads the hidden state."""
        return self.layers[1]

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, safe for ``torch.load(weights_only=True)`` and YAML."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def as_stage(value: Stage | Mapping[str, Any]) -> Stage:
    """Accept a :class:`Stage` or its dict form (as stored in checkpoints and YAML)."""
    if isinstance(value, Stage):
        return value
    if isinstance(value, Mapping):
        return Stage(**{k: (tuple(v) if k == "layers" else v) for k, v in value.items()})
    raise TypeError(f"a stage must be a Stage or a mapping, got {type(value).__name__}: {value!r}")


def validate_stages(stages: Iterable[Stage], n_layers: int) -> tuple[Stage, ...]:
    """Check that ``stages`` tile layers ``1..n_layers`` in order, without gaps or overlaps."""
    stages = tuple(stages)
    if not stages:
        raise ValueError("stages must hold at least one Stage, got an empty list")
    expected_first = 1
    for i, stage in enumerate(stages):
        first, last = stage.layers
        if first != expected_first:
            kind = "a gap" if first > expected_first else "an overlap"
            raise ValueError(
                f"stages[{i}].layers={stage.layers} leaves {kind}: it must start at layer {expected_first} "
                f"so that the stages tile layers 1..{n_layers} in order"
            )
        if last > n_layers:
            raise ValueError(
                f"stages[{i}].layers={stage.layers} goes past the model's last layer: allowed 1..{n_layers}"
            )
        expected_first = last + 1
    if expected_first != n_layers + 1:
        raise ValueError(
            f"stages end at layer {expected_first - 1} but the model has n_layers={n_layers}: "
            f"the last stage must end at layer {n_layers}"
        )
    if all(s.loss_weight == 0 for s in stages):
        raise ValueError(
            f"all stage loss weights are 0 ({[s.loss_weight for s in stages]}): at least one exit must be trained"
        )
    return stages


def check_rope_scaling(scaling: Any) -> dict[str, Any]:
    """``scaling`` as a plain dict, or an error naming the key, its value and what is allowed."""
    where = "TransformerConfig.rope_scaling"
    if not isinstance(scaling, Mapping):
        raise ValueError(f"{where}={scaling!r} is not allowed: a mapping such as {{rope_type: linear, factor: 2.0}}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"{where}.rope_type={kind!r} is not one of {tuple(ROPE_SCALINGS)}")
    needed = ("factor", *ROPE_SCALINGS[kind])
    for key in needed:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where}.{key}={value!r} is not allowed: rope_type {kind} needs a number > 0")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(
            f"{where}: high_freq_factor={scaling['high_freq_factor']} must be larger than "
            f"low_freq_factor={scaling['low_freq_factor']}"
        )
    return {"rope_type": kind, **{key: scaling[key] for key in needed}}


@dataclass
class TransformerConfig:
    """Sizes and exits of an :class:`~lego_lightning.model.ExitTransformer`: declared here once.

    The LightningModules take these fields as keyword arguments (``d_model=64``, on the command
    line ``--model.d_model 64``) and build this config from them.

    Args:
        vocab_size: token ids the embedding and the heads cover.
        n_layers: transformer blocks.
        d_model: width of the residual stream.
        n_heads: attention heads per block; must divide ``d_model``.
        d_ff: hidden width of each block's MLP; default ``4 * d_model``.
        max_seq_len: longest sequence the position embedding covers.
        dropout: on the embeddings, the attention weights and each residual branch, in training.
        positions: ``learned`` absolute embeddings or ``rotary`` (RoPE).
        causal: attention sees only earlier tokens (``False`` for the masked objective).
        head_sharing: ``shared``: every exit uses one LM head; ``separate``: a head per exit.
        tie_embeddings: the LM head reuses the token embedding's weights.
        tie_exit_heads: with ``tie_embeddings`` and separate heads, whether the heads of the exits
            before the last reuse the embedding too (``True``) or each owns a projection
            (``False``: what a pretrained checkpoint with tied embeddings gets, so that its new
            exits have a head to train, initialised from the final one).
        stages: the LEGO blocks; default one stage over all layers (a standard model, one exit).
        n_kv_heads: key/value heads (grouped-query attention, as Llama 3, Mistral and Qwen2);
            default ``n_heads``. Must divide ``n_heads``.
        norm: ``layernorm`` (GPT-2) or ``rmsnorm`` (Llama family), before each block's attention
            and MLP and in every exit head.
        norm_eps: the norms' epsilon.
        activation: the MLP's: ``gelu`` (exact), ``gelu_tanh`` (GPT-2's approximation) or
            ``swiglu`` (Llama family: ``down(silu(gate(x)) * up(x))``, ``d_ff`` wide).
        qkv_bias: the query/key/value projection has a bias (GPT-2, Qwen2; not Llama).
        bias: the attention's output projection and the MLP have biases (GPT-2; not Llama).
        rope_base: the rotary embedding's base (``rope_theta`` in Hugging Face configs).
        rope_scaling: ``None``, or the rotary frequencies' scaling for a context longer than
            pretraining's, in Hugging Face's keys: ``{rope_type: linear, factor}`` (every
            frequency divided by ``factor``) or ``{rope_type: llama3, factor, low_freq_factor,
            high_freq_factor, original_max_position_embeddings}`` (Llama 3.1's: low frequencies
            divided, high ones kept, those between interpolated).
        head_dim: each attention head's width; default ``d_model / n_heads``. Another value (as in
            Mistral NeMo) makes the queries ``n_heads * head_dim`` wide, and the output
            projection maps that width back to ``d_model``.
    """

    vocab_size: int
    n_layers: int = 3
    d_model: int = 64
    n_heads: int = 4
    d_ff: int | None = None
    max_seq_len: int = 256
    dropout: float = 0.0
    positions: Positions = "learned"
    causal: bool = True
    head_sharing: HeadSharing = "shared"
    tie_embeddings: bool = False
    tie_exit_heads: bool = True
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    n_kv_heads: int | None = None
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    activation: Activation = "gelu"
    qkv_bias: bool = True
    bias: bool = True
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    head_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"TransformerConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
                )
            self.head_dim = self.d_model // self.n_heads
        elif not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 1:
            raise ValueError(f"TransformerConfig.head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got head_dim = {self.head_dim}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        elif not isinstance(self.d_ff, int) or self.d_ff < 1:
            raise ValueError(f"TransformerConfig.d_ff must be a positive integer or None, got {self.d_ff!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.positions not in POSITIONS:
            raise ValueError(f"TransformerConfig.positions={self.positions!r} is not one of {POSITIONS}")
        if self.head_sharing not in HEAD_SHARING:
            raise ValueError(f"TransformerConfig.head_sharing={self.head_sharing!r} is not one of {HEAD_SHARING}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        elif not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"TransformerConfig.n_kv_heads must be a positive integer dividing n_heads={self.n_heads}, "
                f"got {self.n_kv_heads!r}"
            )
        if self.norm not in NORMS:
            raise ValueError(f"TransformerConfig.norm={self.norm!r} is not one of {NORMS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"TransformerConfig.activation={self.activation!r} is not one of {ACTIVATIONS}")
        for name in ("norm_eps", "rope_base"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a finite number > 0, got {value!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = check_rope_scaling(self.rope_scaling)
        stages = tuple(as_stage(s) for s in self.stages) or (Stage(layers=(1, self.n_layers)),)
        self.stages = validate_stages(stages, self.n_layers)

    @property
    def exit_layers(self) -> tuple[int, ...]:
        """1-based layer index of every exit, shallowest first."""
        return tuple(s.exit_layer for s in self.stages)

    @property
    def attention_width(self) -> int:
        """The queries' (and the attention output's) width: ``n_heads * head_dim``, ``d_model`` unless
        ``head_dim`` says otherwise."""
        assert self.head_dim is not None
        return self.n_heads * self.head_dim
