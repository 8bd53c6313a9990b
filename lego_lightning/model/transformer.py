"""The exit transformer: a pre-norm decoder whose layers are grouped into stages, each ending in an exit.

Shapes: B batch, T sequence, D d_model, H heads, V vocabulary. Layers and exits are numbered
from 1; an exit is named by the layer after which it reads the hidden state.

Plain PyTorch, no Lightning import, so the model can be used and tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego_lightning.model import pretrained
from lego_lightning.model.config import Stage, TransformerConfig

GrowInit = Literal["identity", "copy", "random"]
GROW_INITS: tuple[str, ...] = get_args(GrowInit)


def rotary_frequencies(head_dim: int, base: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """The ``head_dim / 2`` rotation frequencies, scaled as ``TransformerConfig.rope_scaling`` says."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: wavelengths longer than the original context / low_freq_factor are divided by the factor,
    # those shorter than context / high_freq_factor kept, and those between interpolated smoothly.
    context, low, high = (
        scaling["original_max_position_embeddings"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
    )
    wavelength = 2 * math.pi / inv_freq
    smooth = (context / wavelength - low) / (high - low)
    between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    return torch.where((wavelength >= context / high) & (wavelength <= context / low), between, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), applied to queries and keys."""

    def __init__(
        self, head_dim: int, max_seq_len: int, base: float = 10000.0, scaling: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        inv_freq = rotary_frequencies(head_dim, base, scaling)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """Rotate ``x`` ``(B, H, T, hd)``; ``positions`` ``(B, T)`` gives each token's position (default 0..T-1)."""
        if positions is None:
            T = x.shape[-2]
            cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        else:
            cos, sin = self.cos[positions].unsqueeze(1).to(x.dtype), self.sin[positions].unsqueeze(1).to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32 as the Llama family does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


class SelfAttention(nn.Module):
    """Multi-head attention with one fused query/key/value projection.

    With ``n_kv_heads < n_heads`` (grouped-query attention) keys and values have fewer heads,
    each serving ``n_heads / n_kv_heads`` query heads. :meth:`project`, :meth:`to_heads` /
    :meth:`from_heads` and :meth:`attend` are also what the inference paths
    (:mod:`~lego_lightning.model.early_exit`) use to run attention for some tokens or from a
    cache, so the projection, the head layout and the grouping are written once.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        assert config.n_kv_heads is not None and config.head_dim is not None
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.causal = config.causal
        self.dropout = config.dropout
        q, kv = config.attention_width, config.n_kv_heads * config.head_dim
        self.sizes = {"q": q, "k": kv, "v": kv}
        self.qkv = nn.Linear(config.d_model, q + 2 * kv, bias=config.qkv_bias)
        self.proj = nn.Linear(q, config.d_model, bias=config.bias)

    def project(self, h: Tensor, parts: str = "qkv") -> tuple[Tensor, ...]:
        """``parts`` (``"qkv"``, ``"kv"`` or ``"q"``) of ``h`` ``(..., D)`` from the fused projection's rows
        for those parts only (one product)."""
        sizes = [self.sizes[p] for p in parts]
        if parts == "qkv":
            fused = self.qkv(h)
        else:
            start = sum(self.sizes[p] for p in "qkv"[: "qkv".index(parts[0])])
            rows = slice(start, start + sum(sizes))
            bias = None if self.qkv.bias is None else self.qkv.bias[rows]
            fused = F.linear(h, self.qkv.weight[rows], bias)
        return fused.split(sizes, dim=-1)

    def to_heads(self, t: Tensor) -> Tensor:  # (B, S, heads * hd) -> (B, heads, S, hd)
        B, S, _ = t.shape
        return t.view(B, S, -1, self.head_dim).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        """Scaled dot-product attention of ``(B, H, S, hd)`` queries over keys and values with ``n_kv_heads``."""
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=self.n_kv_heads != self.n_heads, **kwargs)

    @staticmethod
    def from_heads(t: Tensor) -> Tensor:  # (B, H, S, hd) -> (B, S, H * hd)
        B, H, S, hd = t.shape
        return t.transpose(1, 2).reshape(B, S, H * hd)

    def forward(self, x: Tensor, rotary: RotaryEmbedding | None) -> Tensor:
        q, k, v = (self.to_heads(t) for t in self.project(x))  # (B, H, T, hd)
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        y = self.attend(q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(self.from_heads(y))


class MLP(nn.Module):
    """``proj(act(fc(x)))``; with SwiGLU ``fc`` holds the gate's and the up projection's rows, in that order."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        assert config.d_ff is not None
        self.activation = config.activation
        width = 2 * config.d_ff if config.activation == "swiglu" else config.d_ff
        self.fc = nn.Linear(config.d_model, width, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none"))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.ln1 = make_norm(config)
        self.attn = SelfAttention(config)
        self.ln2 = make_norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rotary: RotaryEmbedding | None) -> Tensor:
        return self.after_attention(x, self.attn(self.ln1(x), rotary))

    def after_attention(self, x: Tensor, attended: Tensor) -> Tensor:
        """The block from its attention's output ``attended`` (projected, ``(..., D)``) on: residual, MLP, residual.

        The inference paths that compute attention their own way (for the tokens that continue,
        from a KV cache) finish every block here, so the block's arithmetic is written once.
        """
        x = x + self.drop(attended)
        return x + self.drop(self.mlp(self.ln2(x)))

    def residual_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The layers that write into the residual stream; zero them and the block is the identity."""
        return self.attn.proj, self.mlp.proj


class ExitHead(nn.Module):
    """Final norm and linear map to the vocabulary."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm = make_norm(config)
        self.proj = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, h: Tensor) -> Tensor:  # (..., D) -> (..., V)
        return self.proj(self.norm(h))


class ExitTransformer(nn.Module):
    """A transformer language model with an exit after every stage.

    ``head_sharing="shared"`` uses one head for every exit; ``"separate"`` gives each stage its
    own. ``tie_embeddings`` ties every head's projection to the token embedding (only the last
    exit's when ``tie_exit_heads`` is off).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.positions == "learned" else None
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_base, config.rope_scaling)
            if config.positions == "rotary"
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        n_heads = 1 if config.head_sharing == "shared" else len(config.stages)
        self.heads = nn.ModuleList(ExitHead(config) for _ in range(n_heads))
        self.apply(self._init_weights)
        self._scale_residual_init(self.blocks)
        self._tie_heads()

    # ----------------------------------------------------------------------------- pretrained
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        exits: Sequence[int] | None = None,
        head_sharing: str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> ExitTransformer:
        """A GPT-2 or Llama-family checkpoint in the Hugging Face format (a folder, or a hub name),
        converted, with exits after ``exits``; see :mod:`lego_lightning.model.pretrained`."""
        folder, config, saved_exit_heads = pretrained.pretrained_config(path, exits, head_sharing)
        model = cls(config)
        model.load_state_dict(pretrained.converted_state(folder, model, saved_exit_heads), strict=True)
        if dtype is not None:
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model

    def save_pretrained(self, path: str | Path) -> Path:
        """The trunk in the Hugging Face format, loadable by ``transformers``, and the exits beside it."""
        return pretrained.save_pretrained(self, path)

    # ----------------------------------------------------------------------------------- init
    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _scale_residual_init(self, blocks: Sequence[Block]) -> None:
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers) to keep the stream's variance flat.
        std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in blocks:
            for lin in block.residual_projections():
                nn.init.normal_(lin.weight, mean=0.0, std=std)

    def _tie_heads(self) -> None:
        if not self.config.tie_embeddings:
            return
        for head in self.heads:
            if self.config.tie_exit_heads or head is self.heads[-1]:
                head.proj.weight = self.tok_emb.weight
            elif head.proj.weight is self.tok_emb.weight:  # the last head until a stage grew above it
                head.proj.weight = nn.Parameter(head.proj.weight.detach().clone())

    # -------------------------------------------------------------------------------- queries
    @property
    def exit_layers(self) -> tuple[int, ...]:
        """1-based layer of every exit, shallowest first."""
        return self.config.exit_layers

    def stage_index(self, exit_layer: int) -> int:
        """Position of the stage whose exit is after ``exit_layer``."""
        try:
            return self.exit_layers.index(exit_layer)
        except ValueError:
            raise ValueError(
                f"exit_layer={exit_layer} is not an exit; exits are after layers {self.exit_layers}"
            ) from None

    def head(self, exit_layer: int) -> ExitHead:
        """The head used by the exit after ``exit_layer``."""
        index = self.stage_index(exit_layer)
        return self.heads[0 if self.config.head_sharing == "shared" else index]

    def named_stage_parameters(self) -> Iterator[tuple[int, str, nn.Parameter]]:
        """Yield ``(stage_index, name, parameter)`` once per parameter.

        Embeddings belong to the first stage; a shared head to the last stage (it is the output
        layer of the deepest exit); a separate head to its own stage. Tied weights appear once.
        """
        layer_to_stage = {
            layer: i for i, s in enumerate(self.config.stages) for layer in range(s.layers[0], s.layers[1] + 1)
        }
        last = len(self.config.stages) - 1
        for name, param in self.named_parameters():  # named_parameters already skips tied duplicates
            top, _, rest = name.partition(".")
            if top == "blocks":
                stage = layer_to_stage[int(rest.split(".")[0]) + 1]
            elif top == "heads":
                stage = last if self.config.head_sharing == "shared" else int(rest.split(".")[0])
            else:
                stage = 0
            yield stage, name, param

    # -------------------------------------------------------------------------------- forward
    def embed(self, idx: Tensor, start: int = 0, positions: Tensor | None = None) -> Tensor:
        """Token (and learned position) embeddings: ``(B, T) -> (B, T, D)``, positions from ``start``,
        or each token's own ``positions`` ``(B, T)`` (decoding, which has checked them against the context:
        reading them back here would wait for the device at every step)."""
        T = idx.shape[1]
        if positions is None and self.config.max_seq_len < start + T:
            raise ValueError(
                f"sequence length {start + T} is larger than the model's context max_seq_len={self.config.max_seq_len}"
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device) if positions is None else positions)
        return self.drop(x)

    def hidden_states(
        self, idx: Tensor, exit_layers: Sequence[int] | None = None, keep: Tensor | None = None
    ) -> dict[int, Tensor]:
        """Hidden states ``(B, T, D)`` after each requested exit layer.

        Only the layers up to the deepest requested exit run: asking for a shallow exit costs
        only the layers below it. ``keep`` ``(B, n_layers)`` bool is layer dropout's mask
        (:mod:`~lego_lightning.model.layer_dropout`, training only): a sample whose entry is
        ``False`` skips that layer, its state passing through unchanged.
        """
        wanted = sorted(set(self.exit_layers if exit_layers is None else exit_layers))
        for layer in wanted:
            self.stage_index(layer)  # raises a clear error for a layer that is not an exit
        out: dict[int, Tensor] = {}
        x = self.embed(idx)
        for i, block in enumerate(self.blocks[: wanted[-1]], start=1):
            y = block(x, self.rotary)
            # Every sample runs the layer and a skipping one keeps its input: no data-dependent shapes to compile.
            x = y if keep is None else torch.where(keep[:, i - 1, None, None], y, x)
            if i in wanted:
                out[i] = x
        return out

    def forward(self, idx: Tensor, exit_layers: Sequence[int] | None = None) -> dict[int, Tensor]:
        """Logits ``(B, T, V)`` at each requested exit (all exits by default), keyed by exit layer."""
        return {layer: self.head(layer)(h) for layer, h in self.hidden_states(idx, exit_layers).items()}

    # --------------------------------------------------------------------------------- growth
    @torch.no_grad()
    def init_stage(self, stage_index: int, init: GrowInit = "identity") -> None:
        """Prepare a stage that was built ahead and never trained, for growth.

        ``init``:
          * ``"identity"``: zero the residual branches, so the stage passes its input through
            and its exit computes what the previous exit computed.
          * ``"copy"``: layer ``j`` of an ``n``-layer stage copies layer ``first - n + j`` below
            it (the top of the stack under the stage, repeated when ``n`` exceeds it).
          * ``"random"``: keep the usual initialisation the stage was built with.

        Nothing is drawn from the random generator here: the stage's initial weights come from
        when it was built (and from checkpoints), so a resumed run grows exactly as the
        uninterrupted one. With separate heads the stage's head becomes a copy of the previous
        exit's head; a shared head is left as it is. Tensors change in place, so a model already
        wrapped for distributed training stays valid (every rank makes the same call).
        """
        if init not in GROW_INITS:
            raise ValueError(f"init={init!r} is not one of {GROW_INITS}")
        if not 1 <= stage_index < len(self.config.stages):
            raise ValueError(
                f"stage_index={stage_index} cannot grow: allowed 1..{len(self.config.stages) - 1} "
                "(stage 0 has nothing below it)"
            )
        first, last = self.config.stages[stage_index].layers
        n = last - first + 1
        below = first - 1
        for j, block in enumerate(self.blocks[first - 1 : last]):
            if init == "copy":
                block.load_state_dict(self.blocks[(below - n + j) % below].state_dict())
            elif init == "identity":
                for lin in block.residual_projections():
                    lin.weight.zero_()
                    if lin.bias is not None:
                        lin.bias.zero_()
        if self.config.head_sharing == "separate":
            self.heads[stage_index].load_state_dict(self.heads[stage_index - 1].state_dict())

    @torch.no_grad()
    def grow(
        self, n_layers: int, init: GrowInit = "identity", loss_weight: float = 1.0, lr_scale: float = 1.0
    ) -> Stage:
        """Append ``n_layers`` layers as a new stage with its own exit, and return that stage.

        The new stage is initialised by :meth:`init_stage`; with ``init="identity"`` every exit,
        the new one included, computes exactly what the previous deepest exit computed. Grow
        before wrapping the model for distributed training: DDP does not see modules added
        after it wraps the model (for that case build the stage up front and call
        :meth:`init_stage` when it starts training).
        """
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"grow(n_layers=...) must be a positive integer, got {n_layers!r}")
        if init not in GROW_INITS:
            raise ValueError(f"grow(init={init!r}) is not one of {GROW_INITS}")
        old = self.config.n_layers
        stage = Stage(layers=(old + 1, old + n_layers), loss_weight=loss_weight, lr_scale=lr_scale)
        self.config = replace(self.config, n_layers=old + n_layers, stages=(*self.config.stages, stage))
        ref = next(self.parameters())
        new_blocks = [Block(self.config).to(device=ref.device, dtype=ref.dtype) for _ in range(n_layers)]
        for block in new_blocks:
            block.apply(self._init_weights)
        self._scale_residual_init(new_blocks)
        self.blocks.extend(new_blocks)
        if self.config.head_sharing == "separate":
            self.heads.append(ExitHead(self.config).to(device=ref.device, dtype=ref.dtype))
            self._tie_heads()
        self.init_stage(len(self.config.stages) - 1, init)
        return stage
