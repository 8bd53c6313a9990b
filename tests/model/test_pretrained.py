"""Hugging Face checkpoints converted to ExitTransformer and back, checked against transformers' own models.

Each family is a tiny random model that transformers builds and saves to a temp folder: a real
checkpoint, nothing downloaded.
"""

import json

import pytest
import torch
import transformers
from torch.testing import assert_close

from lego_lightning import ExitTransformer, TransformerConfig
from lego_lightning.decoding import generate

V = 96
LLAMA_SIZES = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4}
FAMILIES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=V, eos_token_id=0)
    ),
    "llama_gqa": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **LLAMA_SIZES, num_key_value_heads=2, max_position_embeddings=64, vocab_size=V, rope_theta=5e5
        )
    ),
    # Llama 3.1's rope scaling: of 4 frequencies one is kept, one interpolated and two divided by the factor.
    "llama3_rope_scaled": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **LLAMA_SIZES,
            num_key_value_heads=2,
            max_position_embeddings=64,
            vocab_size=V,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 0.5,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    ),
    # Heads wider than hidden_size / num_attention_heads (as Mistral NeMo's): 4 x 16 = 64 against 32.
    "mistral_wide_heads": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(
            **LLAMA_SIZES, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, vocab_size=V
        )
    ),
    "qwen2_tied": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            **LLAMA_SIZES, num_key_value_heads=1, max_position_embeddings=64, vocab_size=V, tie_word_embeddings=True
        )
    ),
}


def randomise(model):
    # transformers initialises norms to 1 and biases to 0; random values test that each lands in its place.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "ln" in name else 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = randomise(FAMILIES[request.param]()).eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder


def tokens(batch=3, length=12, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_converted_logits_equal_transformers_own(saved):
    _, hf, folder = saved
    ours = ExitTransformer.from_pretrained(folder).eval()
    idx = tokens()
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)[ours.config.n_layers]
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_greedy_generation_with_routing_off_gives_transformers_tokens(saved):
    _, hf, folder = saved
    ours = ExitTransformer.from_pretrained(folder, exits=[2]).eval()
    prompt = tokens(batch=2, length=5, seed=2)
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    assert torch.equal(generate(ours, prompt, 10).tokens, expected)


def test_save_pretrained_is_read_back_by_transformers_with_the_same_logits(saved, tmp_path):
    _, hf, folder = saved
    ours = ExitTransformer.from_pretrained(folder).eval()
    ours.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = tokens(seed=3)
    with torch.no_grad():
        assert_close(again(idx).logits, hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_exits_share_the_final_head_by_default_and_can_own_a_copy(saved):
    _, _, folder = saved
    shared = ExitTransformer.from_pretrained(folder, exits=[1, 3])
    assert shared.exit_layers == (1, 3, 4) and len(shared.heads) == 1
    separate = ExitTransformer.from_pretrained(folder, exits=[1, 3], head_sharing="separate").eval()
    assert len(separate.heads) == 3
    own = {id(h.proj.weight) for h in separate.heads[:-1]}
    assert len(own) == 2 and id(separate.tok_emb.weight) not in own  # new parameters, even on a tied checkpoint
    idx = tokens(seed=4)
    with torch.no_grad():
        a, b = shared.eval()(idx), separate(idx)
    for layer in (1, 3, 4):  # the copies start equal to the shared head
        assert_close(a[layer], b[layer])


def test_separate_exit_heads_come_back_from_save_pretrained(saved, tmp_path):
    _, _, folder = saved
    model = ExitTransformer.from_pretrained(folder, exits=[2], head_sharing="separate").eval()
    with torch.no_grad():
        model.heads[0].proj.weight.mul_(1.5)  # its own copy, even where the final head is tied to the embedding
        model.heads[0].norm.weight.add_(1)
    model.save_pretrained(tmp_path)
    back = ExitTransformer.from_pretrained(tmp_path).eval()
    assert back.exit_layers == (2, 4) and back.config.head_sharing == "separate"
    idx = tokens(seed=5)
    with torch.no_grad():
        for layer, logits in model(idx).items():
            assert_close(back(idx)[layer], logits)


def test_a_model_trained_here_exports_to_gpt2_and_comes_back_with_exits(tmp_path):
    # configs/standard.yaml's layer: learned positions, layer norm, exact GELU, biases, an untied head.
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, n_layers=4, d_model=32, n_heads=4, max_seq_len=32)
    ours = ExitTransformer(cfg).eval()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = tokens(seed=6)
    with torch.no_grad():
        assert_close(hf(idx).logits, ours(idx)[4], rtol=1e-5, atol=1e-5)
        with_exits = ExitTransformer.from_pretrained(tmp_path, exits=[2]).eval()
        logits = with_exits(idx)
        assert_close(logits[4], ours(idx)[4])
        x = ours.embed(idx)
        for block in ours.blocks[:2]:
            x = block(x, ours.rotary)
        assert_close(logits[2], ours.heads[0](x))  # the new exit: the final norm and head after layer 2


def test_bad_pretrained_input_is_named(saved, tmp_path):
    _, _, folder = saved
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        ExitTransformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"exits=\[0, 2\] has \[0\] outside 1..4"):
        ExitTransformer.from_pretrained(folder, exits=[0, 2])
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": V}))
    with pytest.raises(ValueError, match=r"model_type='bert' is not a family we convert: allowed"):
        ExitTransformer.from_pretrained(other)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = V + 1  # the tensors say V
    (wrong / "config.json").write_text(json.dumps(config))
    (wrong / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"has shape .* its config.json says .*: the tensors do not match the config"):
        ExitTransformer.from_pretrained(wrong)


def test_a_layer_no_hugging_face_architecture_has_is_refused_on_export(tmp_path):
    model = ExitTransformer(TransformerConfig(vocab_size=V, n_layers=2, d_model=16, n_heads=2, positions="rotary"))
    with pytest.raises(
        ValueError, match=r"no Hugging Face architecture has this layer \(positions=rotary, norm=layernorm"
    ):
        model.save_pretrained(tmp_path)


def test_loading_in_bfloat16_keeps_the_logits_close(saved):
    _, hf, folder = saved
    half = ExitTransformer.from_pretrained(folder, dtype="bfloat16").eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    idx = tokens(seed=7)
    with torch.no_grad():
        expected = hf(idx).logits
        got = half(idx)[4].float()
    assert (got - expected).norm() / expected.norm() < 0.02  # bf16 keeps about 3 significant digits


def test_linear_rope_scaling_converts(tmp_path):
    torch.manual_seed(0)
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    config = transformers.LlamaConfig(**LLAMA_SIZES, max_position_embeddings=64, vocab_size=V, rope_parameters=rope)
    hf = randomise(transformers.LlamaForCausalLM(config)).eval()
    hf.save_pretrained(tmp_path)
    ours = ExitTransformer.from_pretrained(tmp_path).eval()
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    idx = tokens(seed=9)
    with torch.no_grad():
        assert_close(ours(idx)[4], hf(idx).logits, rtol=1e-5, atol=1e-5)
