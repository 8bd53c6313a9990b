"""Self-speculative decoding: exactly full depth's greedy tokens, full depth's sampling distribution, in any batch."""

import math

import pytest
import torch
import transformers

from lego_lightning import ExitTransformer, Stage, TransformerConfig
from lego_lightning.decoding import Sampling, generate
from lego_lightning.decoding.speed import (
    acceptance_needed,
    measure_step_costs,
    round_speedup,
    speedup_bound,
    tokens_per_verification,
)
from lego_lightning.model.exit_classifier import ExitClassifier
from tests.decoding.test_generate import PROMPTS, left_padded
from tests.model.test_early_exit import V, model_for
from tests.model.test_pretrained import FAMILIES, randomise

EXITS = [Stage((1, 1)), Stage((2, 2)), Stage((3, 4))]


def drafting_model(seed, positions, heads):
    """A 4-layer model with exits after layers 1, 2 and 4 whose early exits agree with the last one only in part.

    At initialisation the layers barely change the residual stream, so a shared head agrees
    everywhere: their residual branches are scaled up. Random separate heads never agree with
    the final one: each starts as the final head plus noise. Drafts are then sometimes kept and
    sometimes refused.
    """
    model = model_for(seed, positions, heads, stages=EXITS)
    with torch.no_grad():
        for block in model.blocks:
            for lin in block.residual_projections():
                lin.weight.mul_(8)
    if heads == "separate":
        with torch.no_grad():
            for head in model.heads[:-1]:
                head.load_state_dict(model.heads[-1].state_dict())
                head.proj.weight.add_(0.5 * head.proj.weight.std() * torch.randn_like(head.proj.weight))
    return model


def random_prompts(batch, length, seed):
    return torch.randint(1, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("positions", ["learned", "rotary", "llama"])  # llama: grouped-query attention
@pytest.mark.parametrize("heads", ["shared", "separate"])
@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_tokens_are_full_depths_for_every_draft_exit_and_length(positions, heads, batch):
    kept, refused = 0, 0
    for seed in (0, 1):
        model = drafting_model(seed, positions, heads)
        prompt = random_prompts(batch, 5, seed)
        full = generate(model, prompt, 16)
        for draft_exit in (1, 2):
            for k in (1, 3, 6):
                got = generate(model, prompt, 16, draft_exit=draft_exit, num_speculations=k)
                assert torch.equal(got.tokens, full.tokens), (seed, draft_exit, k)
                assert (got.exit_position == 2).all()  # every token is the final exit's
                assert (got.accepted <= got.drafts).all() and (got.drafts <= k * got.verifications).all()
                # A round that kept fewer drafts than it made refused one; kept drafts plus refused ones
                # cannot exceed the drafts.
                assert (got.refusals <= got.verifications).all() and (got.accepted + got.refusals <= got.drafts).all()
                # Each round keeps its accepted drafts and one token of the full model's: 16 in all.
                assert torch.equal(got.accepted + got.verifications + 1, torch.full((batch,), 16))
                if batch == 1:  # a round runs the lower layers m + 1 times, m draft heads, the upper layers m + 1 wide
                    work = got.work
                    assert work["draft_layer_tokens"] == work["verify_layer_tokens"] == work["final_heads"]
                    assert work["draft_layer_tokens"] == int(got.drafts + got.verifications)
                    assert work["draft_heads"] == int(got.drafts)
                kept += int(got.accepted.sum())
                refused += int((got.drafts - got.accepted).sum())
    assert kept > 0 and refused > 0  # both branches ran: drafts kept, and caches rolled back after a refusal


@pytest.mark.parametrize("positions", ["learned", "rotary", "llama"])
def test_ragged_prompts_with_end_tokens_get_each_prompts_own_tokens(positions):
    model = drafting_model(0, positions, "shared")
    ids, mask = left_padded(PROMPTS)
    free = generate(model, ids, 12, attention_mask=mask).tokens
    eos = int(free[1, -8])  # a token the second prompt produces early: it ends there
    full = generate(model, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=39)
    got = generate(model, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=39, draft_exit=1,
                   num_speculations=3)  # fmt: skip
    assert torch.equal(got.tokens, full.tokens)
    assert torch.equal(got.exit_position == -1, full.exit_position == -1)
    made = (got.exit_position >= 0).sum(1)
    assert made[1] < 12  # the second row ended early
    # A row that has ended runs no more rounds: each round gave its kept drafts and one more token,
    # the last one cut at the end token.
    rounds_gave = got.accepted + got.verifications + 1
    assert torch.equal(rounds_gave[made == 12], made[made == 12])
    assert (made <= rounds_gave).all()
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), 12, eos_token_id=eos, pad_token_id=39, draft_exit=1,
                         num_speculations=3)  # fmt: skip
        assert torch.equal(alone.tokens[0, -12:], got.tokens[row, -12:])


@pytest.fixture(scope="module", params=["gpt2", "llama_gqa", "qwen2_tied"])
def converted(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = randomise(FAMILIES[request.param]()).eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    # No end token: transformers' min_new_tokens would otherwise forbid it where the model prefers it.
    hf.generation_config.eos_token_id = None
    return hf, folder


@pytest.mark.parametrize("head_sharing", ["shared", "separate"])
def test_converted_checkpoints_decode_transformers_greedy_tokens(converted, head_sharing):
    hf, folder = converted
    ours = ExitTransformer.from_pretrained(folder, exits=[1, 2], head_sharing=head_sharing).eval()
    prompt = random_prompts(3, 6, 4)
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    for draft_exit in (1, 2):
        got = generate(ours, prompt, 12, draft_exit=draft_exit, num_speculations=4)
        assert torch.equal(got.tokens, expected), draft_exit


def test_transformers_early_exit_assistant_on_our_export_gives_our_tokens(converted, tmp_path):
    """An exit that reads the final norm and head is what ``generate(assistant_early_exit=E)`` drafts with."""
    hf, folder = converted
    if not isinstance(hf, transformers.LlamaForCausalLM):
        pytest.skip("transformers' early-exit assistant shortens the Llama family's layer loop only")
    ours = ExitTransformer.from_pretrained(folder, exits=[2]).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    theirs.generation_config.eos_token_id = None
    prompt = random_prompts(1, 6, 5)  # transformers' assistant decodes one sequence at a time
    expected = theirs.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, assistant_early_exit=2,
        pad_token_id=0,
    )  # fmt: skip
    got = generate(ours, prompt, 12, draft_exit=2, num_speculations=4)
    assert torch.equal(got.tokens, expected)


def chi_square_p_value(counts, expected):
    """Pearson's test of ``counts`` against ``expected`` (same total); cells expecting under 5 pooled."""
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), statistic.detach() / 2)), dof


@torch.no_grad()
def exact_distribution(model, prompt, n, sampling, exit_layer):
    """``exit_layer``'s probability of every continuation of ``n`` tokens, by enumeration: ``(V ** n,)``."""
    vocab = model.config.vocab_size
    paths, logp = prompt, torch.zeros(1)
    for _ in range(n):
        probs = sampling.probabilities(model(paths, exit_layers=[exit_layer])[exit_layer][:, -1])  # (paths, V)
        logp = (logp[:, None] + probs.clamp(min=1e-30).log()).reshape(-1)
        paths = torch.cat([paths.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(len(paths))[:, None]], 1)
    return logp.exp()


def small_vocabulary_model(vocab):
    """A 3-layer model of ``vocab`` tokens, exits after layers 1 and 3, whose every continuation of a few tokens can
    be enumerated: exit 1 drafts from sharp distributions, which layers 2 and 3 then change measurably."""
    torch.manual_seed(3)
    cfg = TransformerConfig(vocab_size=vocab, n_layers=3, d_model=16, n_heads=2, max_seq_len=16, head_sharing="shared",
                            stages=[Stage((1, 1)), Stage((2, 3))])  # fmt: skip
    model = ExitTransformer(cfg).eval()
    with torch.no_grad():
        model.heads[0].proj.weight.mul_(40)
    return model


@pytest.mark.parametrize(
    "sampling", [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=4), Sampling(temperature=1.3, top_p=0.8)]
)
def test_sampled_tokens_follow_the_full_models_distribution(sampling):
    vocab, n, draws = 6, 3, 3000
    model = small_vocabulary_model(vocab)
    prompt = torch.tensor([[1, 4, 2]])
    exact = exact_distribution(model, prompt, n, sampling, exit_layer=3)
    kwargs = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=11)
    got = generate(model, prompt.repeat(draws, 1), n, draft_exit=1, num_speculations=2, **kwargs)
    assert 0 < int(got.accepted.sum()) < int(got.drafts.sum())  # drafts accepted and refused, both
    index = (got.tokens[:, -n:] * vocab ** torch.arange(n - 1, -1, -1)).sum(1)
    p_value, dof = chi_square_p_value(torch.bincount(index, minlength=vocab**n).float(), exact * draws)
    assert dof >= 10 and p_value > 1e-3, (p_value, dof)
    # The test can fail: the draft exit's own samples are told apart from the full model's.
    shallow = exact_distribution(model, prompt, n, sampling, exit_layer=1)
    p_shallow, _ = chi_square_p_value(torch.bincount(index, minlength=vocab**n).float(), shallow * draws)
    assert p_shallow < 1e-6


def test_a_row_samples_the_same_tokens_alone_or_in_a_batch():
    model = drafting_model(1, "rotary", "shared")
    prompt = random_prompts(4, 5, 2)
    batched = generate(model, prompt, 10, temperature=1.0, top_k=8, seed=[7, 8, 9, 10], draft_exit=1)
    for row in range(4):
        alone = generate(model, prompt[row : row + 1], 10, temperature=1.0, top_k=8, seed=[7 + row], draft_exit=1)
        assert torch.equal(alone.tokens[0], batched.tokens[row])


def test_adaptive_drafting_stops_a_draft_where_confidence_falls():
    model = drafting_model(0, "rotary", "shared")
    prompt = random_prompts(8, 5, 3)
    full = generate(model, prompt, 14).tokens
    capped = generate(model, prompt, 14, draft_exit=1, num_speculations=4)
    never = generate(model, prompt, 14, draft_exit=1, num_speculations=4, draft_threshold=1.0)
    assert torch.equal(never.tokens, full) and int(never.drafts.sum()) == 0  # no exit is ever that sure
    always = generate(model, prompt, 14, draft_exit=1, num_speculations=4, draft_threshold=0.0)
    assert torch.equal(always.drafts, capped.drafts)
    middle = torch.softmax(model(full, exit_layers=[1])[1], -1).amax(-1).median().item()
    some = generate(model, prompt, 14, draft_exit=1, num_speculations=4, draft_threshold=middle)
    assert torch.equal(some.tokens, full)
    assert 0 < int(some.drafts.sum()) < int(capped.drafts.sum())
    # Refusals come from drafts the exit was unsure of: stopping there wastes fewer drafts.
    refused = lambda g: float((g.drafts - g.accepted).sum() / g.drafts.sum())  # noqa: E731
    assert refused(some) < refused(capped)


def test_a_learned_exit_classifier_can_decide_when_to_stop_drafting():
    model = drafting_model(0, "rotary", "shared")
    classifier = ExitClassifier(d_model=16, exit_layers=[1, 2]).eval()
    prompt = random_prompts(3, 5, 3)
    full = generate(model, prompt, 10).tokens
    for bias, drafted in ((20.0, True), (-20.0, False)):  # always sure, never sure
        with torch.no_grad():
            for p in classifier.parameters():
                p.zero_()
            classifier.nets["1"][1].bias.fill_(bias)
        got = generate(model, prompt, 10, draft_exit=1, num_speculations=3, draft_threshold=0.5, confidence="learned",
                       hidden_confidence=classifier)  # fmt: skip
        assert torch.equal(got.tokens, full)
        assert (int(got.drafts.sum()) > 0) == drafted
    with pytest.raises(ValueError, match="hidden_confidence"):
        generate(model, prompt, 4, draft_exit=1, draft_threshold=0.5, confidence="learned")


def test_bad_speculation_settings_are_named_before_any_work():
    model = drafting_model(0, "learned", "shared")
    prompt = random_prompts(2, 4, 0)
    with pytest.raises(ValueError, match=r"draft_exit=3 is not an exit before the last.*allowed \(1, 2\)"):
        generate(model, prompt, 4, draft_exit=3)
    with pytest.raises(ValueError, match=r"draft_exit=4 is not an exit before the last"):
        generate(model, prompt, 4, draft_exit=4)
    with pytest.raises(ValueError, match=r"num_speculations=0: allowed a positive integer"):
        generate(model, prompt, 4, draft_exit=1, num_speculations=0)
    with pytest.raises(ValueError, match=r"routing and self-speculative decoding are two ways"):
        generate(model, prompt, 4, threshold=0.5, draft_exit=1)
    with pytest.raises(ValueError, match=r"draft_threshold=0.5 .* needs a draft_exit"):
        generate(model, prompt, 4, draft_threshold=0.5)
    for draft_exit in (1, None):  # full-depth decoding says it too (it once failed on an index)
        with pytest.raises(ValueError, match=r"max_new_tokens=0: allowed a positive integer"):
            generate(model, prompt, 0, draft_exit=draft_exit)
    with pytest.raises(ValueError, match=r"exceeds max_seq_len=24"):
        generate(model, prompt, 21, draft_exit=1)


def test_the_speed_bound_counts_tokens_per_round_over_its_cost():
    assert tokens_per_verification(0.0, 4) == 1  # every draft refused: the full model's own token
    assert tokens_per_verification(1.0, 4) == 5
    assert tokens_per_verification(0.5, 2) == pytest.approx(1.75)
    # Drafts at a quarter of a full step, verification at one full step, all accepted: 5 tokens for 2 steps.
    assert speedup_bound(1.0, 4, draft_cost=0.25, verify_cost=1.0, full_cost=1.0) == pytest.approx(2.5)
    assert speedup_bound(0.0, 4, draft_cost=0.25, verify_cost=1.0, full_cost=1.0) == pytest.approx(0.5)
    assert round_speedup(3.0, 2.5, draft_cost=0.2, verify_cost=1.0, full_cost=1.0) == pytest.approx(2.0)
    # The expected tokens per round under independent acceptance is what a simulation finds.
    generator = torch.Generator().manual_seed(0)
    accept = torch.rand(20000, 3, generator=generator) < 0.7
    simulated = 1 + accept.long().cumprod(1).sum(1).float().mean().item()
    assert simulated == pytest.approx(tokens_per_verification(0.7, 3), rel=0.02)
    # The acceptance a speed-up needs is where the bound reaches it; past every draft accepted, none.
    needed = acceptance_needed(2.0, 4, draft_cost=0.25, verify_cost=1.0, full_cost=1.0)
    assert 0 < needed < 1 and speedup_bound(needed, 4, 0.25, 1.0, 1.0) == pytest.approx(2.0, rel=1e-6)
    assert acceptance_needed(2.6, 4, draft_cost=0.25, verify_cost=1.0, full_cost=1.0) is None
    with pytest.raises(ValueError, match=r"acceptance=1\.5"):
        tokens_per_verification(1.5, 2)


def test_step_costs_are_measured_through_the_decoding_code():
    model = drafting_model(0, "llama", "shared")
    costs = measure_step_costs(model, draft_exit=1, num_speculations=3, batch_size=2, context=8, repeats=9)
    assert costs.verify > 0
    assert costs.draft < costs.full  # one layer and the head against four layers and the head
    assert math.isfinite(speedup_bound(0.8, 3, costs.draft, costs.verify, costs.full))
