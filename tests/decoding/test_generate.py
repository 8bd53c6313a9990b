"""generate() as people expect of a generator: padded prompts, sampling with seeds, an end token, vs transformers."""

import pytest
import torch
import transformers

from lego_lightning import ExitTransformer
from lego_lightning.decoding import generate
from lego_lightning.model.exit_classifier import ExitClassifier
from tests.model.test_early_exit import model_for

V = 40


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[5, 9, 2, 7, 1, 3], [4, 8], [11, 2, 30, 6]]


@pytest.mark.parametrize("positions", ["learned", "rotary", "llama"])
@pytest.mark.parametrize("routed", [False, True])
def test_padded_prompts_of_different_lengths_get_each_prompts_own_tokens(positions, routed):
    model = model_for(0, positions)
    ids, mask = left_padded(PROMPTS)
    threshold = None
    if routed:  # a threshold at which sequences really leave at different exits while they decode
        decoded = generate(model, ids, 8, attention_mask=mask).tokens
        threshold = torch.softmax(model(decoded)[1][:, -8:], -1).amax(-1).quantile(0.8).item()
    batched = generate(model, ids, 8, threshold=threshold, attention_mask=mask)
    if routed:
        assert len(batched.exit_position.unique()) > 1
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), 8, threshold=threshold)
        assert torch.equal(batched.tokens[row, -8:], alone.tokens[0, -8:])
        assert torch.equal(batched.exit_position[row], alone.exit_position[0])


def test_sampling_is_reproducible_per_sequence_alone_or_in_a_batch():
    model = model_for(1, "rotary")
    ids, mask = left_padded(PROMPTS)
    kwargs = {"temperature": 1.3, "top_k": 20, "top_p": 0.9}
    batched = generate(model, ids, 10, attention_mask=mask, seed=[7, 8, 9], **kwargs)
    assert torch.equal(batched.tokens, generate(model, ids, 10, attention_mask=mask, seed=[7, 8, 9], **kwargs).tokens)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), 10, seed=[7 + row], **kwargs)
        assert torch.equal(batched.tokens[row, -10:], alone.tokens[0, -10:])
    greedy = generate(model, ids, 10, attention_mask=mask).tokens
    assert not torch.equal(batched.tokens, greedy)  # a temperature above 1 departs from greedy somewhere
    assert torch.equal(generate(model, ids, 10, attention_mask=mask, seed=0, temperature=2.0, top_k=1).tokens, greedy)
    assert torch.equal(
        generate(model, ids, 10, attention_mask=mask, seed=0, temperature=2.0, top_p=1e-6).tokens, greedy
    )


def test_a_sequence_ends_at_its_end_token_and_is_padded_after_it():
    model = model_for(2, "learned")
    prompt = torch.tensor(PROMPTS[0][:4]).repeat(2, 1)
    prompt[1, 0] = 17  # the second row decodes differently
    free = generate(model, prompt, 10).tokens
    eos = int(free[0, 4 + 3])  # the first row's 4th new token
    ended = generate(model, prompt, 10, eos_token_id=eos, pad_token_id=39)
    for row in range(2):
        new = free[row, 4:].tolist()
        stop = new.index(eos) + 1 if eos in new else 10
        assert ended.tokens[row, 4 : 4 + stop].tolist() == new[:stop]
        assert (ended.tokens[row, 4 + stop :] == 39).all()
        assert (ended.exit_position[row, stop:] == -1).all() and (ended.exit_position[row, :stop] >= 0).all()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, vocab_size=V, pad_token_id=0,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    return hf, ExitTransformer.from_pretrained(folder).eval()


def test_padded_greedy_generation_with_an_end_token_matches_transformers(tiny_llama):
    hf, ours = tiny_llama
    ids, mask = left_padded(PROMPTS)
    free = generate(ours, ids, 8, attention_mask=mask).tokens
    eos = int(free[1, -6])  # a token the second sequence produces: it ends there
    expected = hf.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    got = generate(ours, ids, 8, attention_mask=mask, eos_token_id=eos, pad_token_id=0).tokens
    # transformers stops when every sequence has ended; ours pads to max_new_tokens.
    assert torch.equal(got[:, : expected.shape[1]], expected)
    assert (got[:, expected.shape[1] :] == 0).all()


def test_bad_generation_settings_are_named():
    model = model_for(0)
    ids, mask = left_padded(PROMPTS)
    with pytest.raises(ValueError, match=r"attention_mask must pad prompts on the left"):
        generate(model, ids, 2, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match=r"seed has 2 values for 3 sequences"):
        generate(model, ids, 2, attention_mask=mask, temperature=1.0, seed=[1, 2])
    with pytest.raises(ValueError, match=r"temperature must be >= 0"):
        generate(model, ids, 2, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(model, ids, 2, temperature=1.0, top_p=0.0)


def test_learned_confidence_needs_its_classifier_and_decides_who_leaves():
    model = model_for(3, "rotary")
    ids, mask = left_padded(PROMPTS)
    with pytest.raises(ValueError, match=r"confidence='learned' reads .* pass it as hidden_confidence"):
        generate(model, ids, 6, threshold=0.5, confidence="learned", attention_mask=mask)
    classifier = ExitClassifier(model.config.d_model, model.exit_layers[:-1])

    def decode_with_biases(first: float, second: float):
        with torch.no_grad():
            classifier.nets["1"][1].bias.fill_(first)
            classifier.nets["3"][1].bias.fill_(second)
        return generate(model, ids, 6, 0.5, "learned", classifier, attention_mask=mask)

    everyone_first = decode_with_biases(20.0, -20.0)  # confidence ~1 at exit 1
    assert (everyone_first.exit_position == 0).all()
    assert torch.equal(everyone_first.tokens, generate(model, ids, 6, threshold=0.0, attention_mask=mask).tokens)
    assert (decode_with_biases(-20.0, 20.0).exit_position == 1).all()
    nobody = decode_with_biases(-20.0, -20.0)
    assert (nobody.exit_position == 2).all()
    assert torch.equal(nobody.tokens, generate(model, ids, 6, attention_mask=mask).tokens)


@pytest.mark.parametrize("sampled", [False, True])
def test_a_learned_exit_sharing_the_final_head_reads_it_once_per_step_with_the_same_tokens(sampled):
    shared = model_for(4, "rotary", head_sharing="shared")
    # The same function with a copy of the head per exit: nothing shares the final projection.
    copies = model_for(4, "rotary", head_sharing="separate")
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("heads.")}
    for i in range(len(copies.heads)):
        state |= {f"heads.{i}.{k}": v for k, v in shared.heads[0].state_dict().items()}
    copies.load_state_dict(state)
    classifier = ExitClassifier(shared.config.d_model, shared.exit_layers[:-1])
    ids, mask = left_padded(PROMPTS)
    kwargs = {"attention_mask": mask, "temperature": 1.0 if sampled else 0.0, "seed": 3}

    def decode(model):
        products = []
        hooks = [h.proj.register_forward_hook(lambda m, a, o: products.append(len(a[0]))) for h in model.heads]
        out = generate(model, ids, 8, 0.5, "learned", classifier, **kwargs)
        for hook in hooks:
            hook.remove()
        return out, products

    (waited, one_product), (apart, per_exit) = decode(shared), decode(copies)
    assert len(waited.exit_position.unique()) == 3  # rows leave at every exit
    assert torch.equal(waited.tokens, apart.tokens)
    assert torch.equal(waited.exit_position, apart.exit_position)
    assert len(one_product) == 8 and sum(one_product) == 8 * len(PROMPTS)  # one head product per step, every row
    assert len(per_exit) > 8 and sum(per_exit) == 8 * len(PROMPTS)
