"""Hugging Face checkpoints of GPT-2 and the Llama family (Llama, Mistral, Qwen2) to and from :class:`ExitTransformer`.

Conversion, not wrapping (as litgpt does): the checkpoint's tensors are renamed and reshaped into
our model, so routing, generation, the learned classifier and every callback run on it
unchanged, and no release of ``transformers`` can break them. Only ``safetensors`` is needed to
read and write; ``transformers`` itself is not imported.

Layout differences handled here, once:

* GPT-2 stores its linear maps as ``Conv1D`` (``in x out``): transposed.
* The Llama family rotates the two halves of each head (``rotate_half``); ours rotates adjacent
  pairs. Permuting the query and key rows of each head from one layout to the other gives the
  same attention scores, since a query and a key get the same permutation.
* Queries, keys and values are one fused projection here, gate and up projections one ``fc``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lego_lightning.model.config import ROPE_SCALINGS, Stage, TransformerConfig

# The model these functions read and write is an ExitTransformer, which imports this module (its
# from_pretrained and save_pretrained); they use only its config, heads and state_dict, so nothing
# here imports it back.

GPT2 = "gpt2"
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
FAMILIES = (GPT2, *LLAMA_FAMILY)
EXITS_FILE = "lego_exits.json"  # which layers have exits and how heads are shared, beside the trunk
EXIT_HEADS_FILE = "lego_exit_heads.safetensors"  # the heads other than the final one, when each exit has its own
# GPT-2's names for a block's norms and linear maps, and ours.
GPT2_NORMS = (("ln_1", "ln1"), ("ln_2", "ln2"))
GPT2_LINEARS = (
    ("attn.c_attn", "attn.qkv"),
    ("attn.c_proj", "attn.proj"),
    ("mlp.c_fc", "mlp.fc"),
    ("mlp.c_proj", "mlp.proj"),
)


# ----------------------------------------------------------------------------------------- config
def config_from_hf(
    hf: Mapping[str, Any], exits: Sequence[int] | None = None, head_sharing: str = "shared"
) -> TransformerConfig:
    """Our config for a Hugging Face ``config.json``, with exits after ``exits`` (the last layer always)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"config.json model_type={family!r} is not a family we convert: allowed {FAMILIES} "
            "(GPT-2 and the Llama family: Llama 2/3, Mistral, Qwen2)"
        )
    if family == GPT2:
        activation = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(
            hf.get("activation_function", "gelu_new")
        )
        if activation is None:
            raise ValueError(f"config.json activation_function={hf['activation_function']!r}: allowed gelu, gelu_new")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError(
                "config.json: GPT-2's scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not converted"
            )
        n_layers, sizes = (
            hf["n_layer"],
            {
                "d_model": hf["n_embd"],
                "n_heads": hf["n_head"],
                "d_ff": hf.get("n_inner") or 4 * hf["n_embd"],
                "max_seq_len": hf["n_positions"],
                "positions": "learned",
                "norm": "layernorm",
                "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
                "activation": activation,
            },
        )
    else:
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: the Llama family's MLP is silu (SwiGLU)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 / earlier releases
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", *ROPE_SCALINGS):
            raise ValueError(
                f"config.json rope_type={rope_type!r} is not converted: allowed 'default', {', '.join(ROPE_SCALINGS)}"
            )
        heads = hf["num_attention_heads"]
        max_seq_len = hf["max_position_embeddings"]
        window = hf.get("sliding_window") if hf.get("use_sliding_window", family == "mistral") else None
        if window:  # within the window, sliding-window attention is full attention
            max_seq_len = min(max_seq_len, window)
        n_layers, sizes = (
            hf["num_hidden_layers"],
            {
                "d_model": hf["hidden_size"],
                "n_heads": heads,
                "n_kv_heads": hf.get("num_key_value_heads") or heads,
                "d_ff": hf["intermediate_size"],
                "max_seq_len": max_seq_len,
                "positions": "rotary",
                "norm": "rmsnorm",
                "norm_eps": hf.get("rms_norm_eps", 1e-6),
                "activation": "swiglu",
                "qkv_bias": bool(hf.get("attention_bias", family == "qwen2")),
                "bias": bool(hf.get("mlp_bias", False)),
                "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
                "rope_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                "rope_scaling": None
                if rope_type == "default"
                else {
                    "original_max_position_embeddings": hf["max_position_embeddings"],
                    **rope,
                    "rope_type": rope_type,
                },
            },
        )
        if sizes["bias"]:
            raise ValueError("config.json mlp_bias=true is not converted: the attention output has no bias then")
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        n_layers=n_layers,
        tie_embeddings=bool(hf.get("tie_word_embeddings", family == GPT2)),
        tie_exit_heads=False,  # separate exits get heads of their own to train, even where the final one is tied
        head_sharing=head_sharing,  # type: ignore[arg-type]
        stages=stages_for(exits, n_layers),
        **sizes,
    )


def stages_for(exits: Sequence[int] | None, n_layers: int) -> tuple[Stage, ...]:
    """Stages ending after each layer of ``exits``; the last layer always ends one (the model's own output)."""
    layers = sorted(set(exits or ())) or [n_layers]
    bad = [e for e in layers if not isinstance(e, int) or isinstance(e, bool) or not 1 <= e <= n_layers]
    if bad:
        raise ValueError(f"exits={list(exits or ())} has {bad} outside 1..{n_layers} (the model's layers)")
    if layers[-1] != n_layers:
        layers.append(n_layers)
    return tuple(Stage((first + 1, last)) for first, last in zip([0, *layers[:-1]], layers))


def family_of(cfg: TransformerConfig) -> str:
    """The Hugging Face architecture whose layer ours is; an error for a layer none of them has."""
    gpt2 = (
        cfg.positions == "learned"
        and cfg.norm == "layernorm"
        and cfg.activation in ("gelu", "gelu_tanh")
        and cfg.qkv_bias
        and cfg.bias
        and cfg.n_kv_heads == cfg.n_heads
        and cfg.attention_width == cfg.d_model
    )
    if gpt2 and cfg.causal:
        return GPT2
    if cfg.positions == "rotary" and cfg.norm == "rmsnorm" and cfg.activation == "swiglu" and not cfg.bias:
        return "qwen2" if cfg.qkv_bias else "llama"
    raise ValueError(
        f"no Hugging Face architecture has this layer (positions={cfg.positions}, norm={cfg.norm}, "
        f"activation={cfg.activation}, qkv_bias={cfg.qkv_bias}, bias={cfg.bias}, causal={cfg.causal}, "
        f"head_dim={cfg.head_dim}): GPT-2 is learned/layernorm/gelu with biases and heads of d_model / n_heads, "
        "the Llama family rotary/rmsnorm/swiglu without"
    )


def hf_config_of(cfg: TransformerConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` that ``transformers`` reads back into the same trunk."""
    family = family_of(cfg)
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "dtype": str(dtype)[6:]}
    if family == GPT2:
        return {
            **common,
            "model_type": GPT2,
            "architectures": ["GPT2LMHeadModel"],
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
        }
    return {
        **common,
        "model_type": family,
        "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_base,
        "rope_parameters": {**(cfg.rope_scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_base},
        **({"attention_bias": cfg.qkv_bias, "mlp_bias": False} if family == "llama" else {}),
    }


# ---------------------------------------------------------------------------------------- tensors
def _pairs_adjacent(t: Tensor, heads: int) -> Tensor:
    """Rows of each head from the ``rotate_half`` layout (halves) to ours (adjacent pairs)."""
    hd = t.shape[0] // heads
    return t.reshape(heads, 2, hd // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _pairs_halved(t: Tensor, heads: int) -> Tensor:
    """The inverse of :func:`_pairs_adjacent`."""
    hd = t.shape[0] // heads
    return t.reshape(heads, hd // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def state_from_hf(hf: Mapping[str, Tensor], cfg: TransformerConfig, family: str) -> dict[str, Tensor]:
    """Our ``state_dict`` (one head, the final norm and LM head) from a Hugging Face one."""
    hf = {k.removeprefix("transformer.") if family == GPT2 else k: v for k, v in hf.items()}
    ours: dict[str, Tensor] = {}

    def take(name: str) -> Tensor:
        try:
            return hf[name]
        except KeyError:
            raise ValueError(f"the checkpoint has no tensor {name!r}, which its config.json ({family}) needs") from None

    if family == GPT2:
        ours["tok_emb.weight"], ours["pos_emb.weight"] = take("wte.weight"), take("wpe.weight")
        for i in range(cfg.n_layers):
            p, q = f"h.{i}.", f"blocks.{i}."
            for theirs, mine in GPT2_NORMS:
                ours[q + mine + ".weight"], ours[q + mine + ".bias"] = (
                    take(p + theirs + ".weight"),
                    take(p + theirs + ".bias"),
                )
            for theirs, mine in GPT2_LINEARS:
                ours[q + mine + ".weight"] = take(p + theirs + ".weight").t().contiguous()  # Conv1D: in x out
                ours[q + mine + ".bias"] = take(p + theirs + ".bias")
        ours["heads.0.norm.weight"], ours["heads.0.norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
        ours["heads.0.proj.weight"] = ours["tok_emb.weight"] if cfg.tie_embeddings else take("lm_head.weight")
        return ours
    H, KV = cfg.n_heads, cfg.n_kv_heads
    assert KV is not None
    ours["tok_emb.weight"] = take("model.embed_tokens.weight")
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        ours[q + "ln1.weight"] = take(p + "input_layernorm.weight")
        ours[q + "ln2.weight"] = take(p + "post_attention_layernorm.weight")
        parts = ("weight", "bias") if cfg.qkv_bias else ("weight",)
        for part in parts:
            ours[q + "attn.qkv." + part] = torch.cat(
                [
                    _pairs_adjacent(take(p + f"self_attn.q_proj.{part}"), H),
                    _pairs_adjacent(take(p + f"self_attn.k_proj.{part}"), KV),
                    take(p + f"self_attn.v_proj.{part}"),
                ]
            )
        ours[q + "attn.proj.weight"] = take(p + "self_attn.o_proj.weight")
        ours[q + "mlp.fc.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        ours[q + "mlp.proj.weight"] = take(p + "mlp.down_proj.weight")
    ours["heads.0.norm.weight"] = take("model.norm.weight")
    ours["heads.0.proj.weight"] = ours["tok_emb.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    return ours


def state_to_hf(model: nn.Module) -> dict[str, Tensor]:
    """The trunk and the final exit's head as a Hugging Face ``state_dict`` (what ``from_pretrained`` reads)."""
    cfg, family = model.config, family_of(model.config)
    ours = model.state_dict()
    final = model.head(cfg.n_layers)
    hf: dict[str, Tensor] = {}
    if family == GPT2:
        hf["transformer.wte.weight"], hf["transformer.wpe.weight"] = ours["tok_emb.weight"], ours["pos_emb.weight"]
        for i in range(cfg.n_layers):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for theirs, mine in GPT2_NORMS:
                hf[p + theirs + ".weight"], hf[p + theirs + ".bias"] = (
                    ours[q + mine + ".weight"],
                    ours[q + mine + ".bias"],
                )
            for theirs, mine in GPT2_LINEARS:
                hf[p + theirs + ".weight"] = ours[q + mine + ".weight"].t()
                hf[p + theirs + ".bias"] = ours[q + mine + ".bias"]
        hf["transformer.ln_f.weight"], hf["transformer.ln_f.bias"] = final.norm.weight, final.norm.bias
    else:
        H, KV, Q = cfg.n_heads, cfg.n_kv_heads, cfg.attention_width
        assert KV is not None and cfg.head_dim is not None
        kv = KV * cfg.head_dim
        hf["model.embed_tokens.weight"] = ours["tok_emb.weight"]
        for i in range(cfg.n_layers):
            p, q = f"model.layers.{i}.", f"blocks.{i}."
            hf[p + "input_layernorm.weight"] = ours[q + "ln1.weight"]
            hf[p + "post_attention_layernorm.weight"] = ours[q + "ln2.weight"]
            for part in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                qw, kw, vw = ours[q + "attn.qkv." + part].split([Q, kv, kv])
                hf[p + f"self_attn.q_proj.{part}"] = _pairs_halved(qw, H)
                hf[p + f"self_attn.k_proj.{part}"] = _pairs_halved(kw, KV)
                hf[p + f"self_attn.v_proj.{part}"] = vw
            hf[p + "self_attn.o_proj.weight"] = ours[q + "attn.proj.weight"]
            gate, up = ours[q + "mlp.fc.weight"].chunk(2)
            hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"] = gate, up
            hf[p + "mlp.down_proj.weight"] = ours[q + "mlp.proj.weight"]
        hf["model.norm.weight"] = final.norm.weight
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = final.proj.weight
    return {k: v.detach().contiguous() for k, v in hf.items()}


# ------------------------------------------------------------------------------------------ files
def resolve(path: str | Path) -> Path:
    """A local folder, or a hub name downloaded once into the Hugging Face cache (needs internet)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"pretrained={str(path)!r} has no config.json: a Hugging Face model folder has one")
        return folder
    if folder.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") > 1:
        raise FileNotFoundError(f"pretrained={str(path)!r} is not a folder (a Hugging Face model folder or hub name)")
    from huggingface_hub import snapshot_download  # for users with internet; a local folder needs none of it

    return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))


def read_tensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint: one ``*.safetensors`` file or shards listed in its index."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors")) if p.name != EXIT_HEADS_FILE]
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights (only the safetensors format is read)")
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def read_config(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The checkpoint's folder, its ``config.json``, and the exits :func:`save_pretrained` wrote beside it."""
    folder = resolve(path)
    hf = json.loads((folder / "config.json").read_text())
    saved = json.loads((folder / EXITS_FILE).read_text()) if (folder / EXITS_FILE).is_file() else {}
    return folder, hf, saved


def converted_state(folder: Path, model: nn.Module, saved_exit_heads: bool) -> dict[str, Tensor]:
    """The checkpoint in ``folder`` as ``model``'s ``state_dict``: every exit's head starts as the final one
    (or, with ``saved_exit_heads``, as :func:`save_pretrained` left it); a clear error when shapes differ."""
    hf = json.loads((folder / "config.json").read_text())
    state = state_from_hf(read_tensors(folder), model.config, hf["model_type"])
    final = {k.removeprefix("heads.0."): state.pop(k) for k in list(state) if k.startswith("heads.0.")}
    for i in range(len(model.heads)):
        state.update({f"heads.{i}.{k}": v for k, v in final.items()})
    if saved_exit_heads and len(model.heads) > 1 and (folder / EXIT_HEADS_FILE).is_file():
        from safetensors.torch import load_file

        state.update(load_file(str(folder / EXIT_HEADS_FILE)))
    expected = model.state_dict()
    for k, v in state.items():
        if k in expected and expected[k].shape != v.shape:
            raise ValueError(
                f"the checkpoint's tensor for {k} has shape {tuple(v.shape)}, its config.json says "
                f"{tuple(expected[k].shape)}: the tensors do not match the config"
            )
    return state


def pretrained_config(
    path: str | Path, exits: Sequence[int] | None = None, head_sharing: str | None = None
) -> tuple[Path, TransformerConfig, bool]:
    """A checkpoint's folder, our config for it with exits after ``exits``, and whether to load the exit heads
    :func:`save_pretrained` wrote beside it (when ``exits`` names no others).

    Every exit starts as the final norm and LM head: shared (``head_sharing="shared"``, no new
    parameters, LayerSkip's choice) or a copy per exit (``"separate"``). A folder written by
    :func:`save_pretrained` brings its exits back unless ``exits`` names others.
    """
    folder, hf, saved = read_config(path)
    sharing = head_sharing or (saved.get("head_sharing", "shared") if exits is None else "shared")
    return folder, config_from_hf(hf, exits if exits is not None else saved.get("exits"), sharing), exits is None


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write the trunk and final head in the Hugging Face format (``config.json``, ``model.safetensors``)
    that ``transformers`` loads, and the exits beside it (``lego_exits.json``, and the other heads'
    weights when each exit has its own)."""
    from safetensors.torch import save_file

    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    tensors = state_to_hf(model)
    (folder / "config.json").write_text(json.dumps(hf_config_of(cfg, dtype), indent=2) + "\n")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    exits = {"exits": list(cfg.exit_layers), "head_sharing": cfg.head_sharing}
    (folder / EXITS_FILE).write_text(json.dumps(exits, indent=2) + "\n")
    if cfg.head_sharing == "separate" and len(model.heads) > 1:
        others = {
            f"heads.{i}.{k}": v.detach().contiguous()
            for i, head in enumerate(model.heads[:-1])
            for k, v in head.state_dict().items()
        }
        save_file(others, str(folder / EXIT_HEADS_FILE), metadata={"format": "pt"})
    return folder
