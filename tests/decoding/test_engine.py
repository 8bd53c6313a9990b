"""The engine: continuous batching where every request gets exactly the tokens it gets alone."""

import pytest
import torch

from lego_lightning.decoding import Engine, Request, generate
from lego_lightning.decoding.speed import decoding_flops
from lego_lightning.model import flops
from lego_lightning.model.exit_classifier import ExitClassifier
from tests.decoding.test_speculative import drafting_model
from tests.model.test_early_exit import V

# Ragged prompts, each request with its own settings: greedy and sampled (top-k, top-p), an end token or none.
PROMPTS = [[5, 9, 2, 7, 1, 3], [4, 8], [11, 2, 30, 6], [7], [3, 3, 12, 19, 20], [33, 1, 2], [8, 6, 4, 2, 9, 1, 5]]
SETTINGS = [
    {"max_new_tokens": 12},
    {"max_new_tokens": 5, "temperature": 1.0, "seed": 3},
    {"max_new_tokens": 9, "temperature": 0.8, "top_k": 6, "seed": 4},
    {"max_new_tokens": 14, "temperature": 1.3, "top_p": 0.8, "seed": 5},
    {"max_new_tokens": 7},
    {"max_new_tokens": 11, "temperature": 0.7, "top_k": 10, "top_p": 0.9, "seed": 6},
    {"max_new_tokens": 10},
]
# What each request drafts in the self-speculative engine: own exits and lengths, or none (full depth).
DRAFTS = [
    {"draft_exit": 1, "num_speculations": 3},
    {"draft_exit": 1, "num_speculations": 2},
    {"draft_exit": 2, "num_speculations": 1},
    {},
    {"draft_exit": 2, "num_speculations": 4, "draft_threshold": "typical"},
    {"draft_exit": 1, "num_speculations": 4},
    {"draft_exit": 1, "num_speculations": 1},
]


def typical_confidence(model, exit_layer=1):
    """The median max-prob at an exit over random text: a threshold some tokens reach and others do not."""
    ids = torch.randint(1, V, (8, 12), generator=torch.Generator().manual_seed(0))
    return torch.softmax(model(ids, exit_layers=[exit_layer])[exit_layer], -1).amax(-1).median().item()


def requests(model, policy, eos=None):
    out = []
    for i, (prompt, settings) in enumerate(zip(PROMPTS, SETTINGS)):
        extra = dict(DRAFTS[i]) if policy.startswith("speculative") else {}
        if policy == "speculative_one_exit" and extra:  # one exit: new prompts are prefilled inside the rounds
            extra["draft_exit"] = 1
        if extra.get("draft_threshold") == "typical":
            extra["draft_threshold"] = typical_confidence(model, extra["draft_exit"])
        # Two greedy requests end at a token their free run produces: an end that comes early.
        end = eos[i] if eos is not None and i in (0, 4) else None
        out.append(Request(prompt, eos_token_id=end, **settings, **extra))
    return out


def engine_for(model, policy, slots, classifier=None):
    if policy == "routed":
        return Engine(model, slots, threshold=typical_confidence(model), max_speculations=4)
    if policy == "routed_learned":
        return Engine(model, slots, threshold=0.5, confidence="learned", hidden_confidence=classifier)
    return Engine(model, slots, max_speculations=4)


def alone(model, policy, request, classifier=None):
    engine = engine_for(model, policy, 1, classifier)
    engine.add(request)
    (completion,) = engine.run().values()
    return completion


def no_cache_greedy(model, prompt, n):
    """Plain greedy decoding at full depth without a cache: the whole sequence through the model per token."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat(
            [ids, model(ids, exit_layers=[model.exit_layers[-1]])[model.exit_layers[-1]][:, -1:].argmax(-1)], 1
        )
    return ids[0, len(prompt) :].tolist()


def classifier_for(model):
    classifier = ExitClassifier(model.config.d_model, model.exit_layers[:-1]).eval()
    with torch.no_grad():  # a classifier that sends some rows out early and keeps others
        for net in classifier.nets.values():
            net[1].weight.normal_(0, 2.0)
    return classifier


@pytest.mark.parametrize("positions", ["learned", "rotary", "llama"])
@pytest.mark.parametrize("policy", ["full", "routed", "routed_learned", "speculative", "speculative_one_exit"])
def test_requests_joining_mid_run_get_the_tokens_they_get_alone(policy, positions):
    model = drafting_model(0, positions, "shared")
    classifier = classifier_for(model) if policy == "routed_learned" else None
    free = [alone(model, policy, r, classifier).tokens for r in requests(model, policy)]
    eos = [tokens[len(tokens) // 3] for tokens in free]
    todo = requests(model, policy, eos)
    engine = engine_for(model, policy, 3, classifier)
    ids = [engine.add(r) for r in todo[:4]]
    streamed = {i: [] for i in range(len(todo))}
    done, joined_while_decoding = {}, False
    for step in range(200):
        if step == 2:  # three more arrive while the first ones decode
            ids += [engine.add(r) for r in todo[4:]]
        events = engine.step()
        assert engine.active <= 3
        firsts = {e.id for e in events if not streamed[e.id] and e.tokens}
        going_on = {e.id for e in events if streamed[e.id] and not e.finished}
        joined_while_decoding |= step > 0 and bool(firsts) and bool(going_on)
        for e in events:
            streamed[e.id] += e.tokens
            if e.finished:
                done[e.id] = e.completion
        if not engine.busy:
            break
    assert sorted(done) == list(range(len(todo))) and joined_while_decoding
    reasons = set()
    for request_id, request in zip(ids, todo):
        expected = alone(model, policy, request, classifier)
        got = done[request_id]
        assert got.tokens == expected.tokens == streamed[request_id], (policy, request_id)
        assert got.exit_positions == expected.exit_positions
        assert (got.drafts, got.accepted) == (expected.drafts, expected.accepted)
        reasons.add(got.finish_reason)
        if request.temperature == 0 and not policy.startswith("routed"):  # the full model's own greedy tokens
            assert got.tokens == no_cache_greedy(model, list(request.prompt), len(got.tokens))
    assert reasons == {"eos", "length"}
    if policy.startswith("routed"):
        assert len({e for c in done.values() for e in c.exit_positions}) > 1  # tokens left at several exits
    if policy.startswith("speculative"):
        assert sum(c.accepted for c in done.values()) > 0
        assert sum(c.drafts - c.accepted for c in done.values()) > 0


def test_a_finished_request_frees_its_slot_for_the_next_and_memory_is_the_slots():
    model = drafting_model(1, "rotary", "shared")
    engine = Engine(model, slots=2, max_speculations=2)
    cache_bytes = engine.cache.keys.nbytes + engine.cache.values.nbytes
    short, long = Request([1, 2], max_new_tokens=3), Request([3, 4], max_new_tokens=9)
    third = Request([5], max_new_tokens=4, draft_exit=1, num_speculations=2)
    ids = [engine.add(short), engine.add(long), engine.add(third)]
    first = engine.step()
    assert {e.id for e in first} == {ids[0], ids[1]} and engine.active == 2  # the third waits for a slot
    for _ in range(5):
        if any(e.id == ids[0] and e.finished for e in engine.step()):
            break
    assert engine.active == 1 and len(engine.waiting) == 1  # the short one left its slot at once
    after = engine.step()
    assert ids[2] in {e.id for e in after}  # it took the freed slot while the long one went on
    assert any(e.id == ids[1] and not e.finished for e in after)
    many = [engine.add(Request([7, 7, 7], max_new_tokens=3)) for _ in range(50)]
    done = engine.run()
    assert all(len(done[i].tokens) == 3 for i in many) and len(done[ids[1]].tokens) == 9
    assert engine.cache.keys.nbytes + engine.cache.values.nbytes == cache_bytes  # the slots' caches, nothing more


def test_cancel_frees_the_slot_and_the_others_go_on_with_their_tokens():
    model = drafting_model(2, "learned", "shared")
    engine = Engine(model, slots=2)
    keep, drop = engine.add(Request([1, 2, 3], max_new_tokens=10)), engine.add(Request([4, 5], max_new_tokens=10))
    late = engine.add(Request([6], max_new_tokens=5))
    engine.step()
    cancelled = engine.cancel(drop)
    assert cancelled.finish_reason == "cancelled" and len(cancelled.tokens) >= 1
    done = engine.run()
    assert drop not in done and engine.cancel(drop) is None
    assert done[keep].tokens == no_cache_greedy(model, [1, 2, 3], 10)
    assert done[late].tokens == no_cache_greedy(model, [6], 5)


def test_generate_over_more_prompts_than_slots_gives_each_prompt_its_own_tokens():
    model = drafting_model(0, "rotary", "shared")
    prompt = torch.randint(1, V, (7, 5), generator=torch.Generator().manual_seed(0))
    for kwargs in ({}, {"draft_exit": 1, "num_speculations": 3}, {"temperature": 1.0, "top_k": 8, "seed": 2},
                   {"threshold": 0.3}):  # fmt: skip
        every_row = generate(model, prompt, 9, **kwargs)
        assert torch.equal(generate(model, prompt, 9, slots=2, **kwargs).tokens, every_row.tokens), kwargs


def test_bad_requests_and_engines_are_named_before_any_work():
    model = drafting_model(0, "learned", "shared")
    engine = Engine(model, slots=2, max_speculations=3)
    cases = [
        (Request([], max_new_tokens=2), r"prompt has no tokens"),
        (Request([1, V], max_new_tokens=2), rf"prompt has token ids \[{V}\] outside the vocabulary 0\.\.{V - 1}"),
        (Request([1], max_new_tokens=0), r"max_new_tokens=0: allowed a positive integer"),
        (Request([1] * 20, max_new_tokens=5), r"prompt \(20\) \+ max_new_tokens \(5\) exceeds max_seq_len=24"),
        (Request([1], max_new_tokens=4, temperature=-0.5), r"temperature must be >= 0"),
        (Request([1], max_new_tokens=4, temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (Request([1], max_new_tokens=4, temperature=1.0, top_k=0), r"top_k must be a positive integer"),
        (Request([1], max_new_tokens=4, eos_token_id=V), rf"eos_token_id={V}: allowed a token id"),
        (Request([1], max_new_tokens=4, draft_exit=4), r"draft_exit=4 is not an exit before the last"),
        (
            Request([1], max_new_tokens=4, draft_exit=1, num_speculations=0),
            r"num_speculations=0: allowed a positive integer",
        ),
        (
            Request([1], max_new_tokens=4, draft_exit=1, num_speculations=5),
            r"num_speculations=5: .* max_speculations=3",
        ),
        (
            Request([1], max_new_tokens=4, draft_threshold=0.5),
            r"draft_threshold=0.5 stops self-speculative drafts: it needs a draft_exit",
        ),
        (
            Request([1], max_new_tokens=4, draft_exit=1, num_speculations=2, draft_threshold=2.0),
            r"draft_threshold must be in \[0, 1\], got 2.0",
        ),
    ]
    for request, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.add(request)
    assert not engine.busy  # nothing was queued, nothing decoded
    with pytest.raises(ValueError, match=r"routing and self-speculative decoding are two ways"):
        Engine(model, slots=1, threshold=0.5).add(Request([1], max_new_tokens=4, draft_exit=1))
    with pytest.raises(ValueError, match=r"slots=0: allowed a positive integer"):
        Engine(model, slots=0)
    with pytest.raises(ValueError, match=r"slots=10000000000000 needs .* MiB of KV cache .*: at most \d+ slots fit"):
        Engine(model, slots=10**13)
    with pytest.raises(ValueError, match=r"confidence='learned' reads .* pass it as hidden_confidence"):
        Engine(model, slots=1, threshold=0.5, confidence="learned")


def test_compiled_passes_at_fixed_shapes_give_eager_tokens_and_compile_once_per_kind_of_pass():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = drafting_model(0, "rotary", "shared")
    todo = [dict(r.__dict__) for r in requests(model, "speculative")]
    for r in todo:  # one draft exit: passes of one position (steps, drafts) and of K + 1 (verifications)
        if r["draft_exit"] is not None:
            r |= {"draft_exit": 1, "draft_threshold": None}

    def run(backend, requests_):
        engine = Engine(model, 3, max_speculations=4, compile_backend=backend)
        ids = [engine.add(Request(**r)) for r in requests_]
        done = engine.run()
        return [done[i].tokens for i in ids]

    eager = run(None, todo)
    assert run("aot_eager", todo) == eager
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 4  # a layer before and after its attention, at each of the two widths
    # Other requests, other joins, leaves and accepted counts: the same graphs, nothing recompiled.
    again = [r | {"max_new_tokens": r["max_new_tokens"] - 2} for r in reversed(todo)]
    assert run("aot_eager", again) == run(None, again)
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_work_counts_each_rows_own_layers_and_prices_as_the_models_flops():
    model = drafting_model(0, "rotary", "shared")
    L, context = model.config.n_layers, 12.0
    full = Engine(model, slots=2)
    for prompt in ([3, 1, 4], [1, 5, 9, 2]):
        full.add(Request(prompt, max_new_tokens=6))
    full.run()
    assert {k for k, v in full.work.items() if v} == {"full_steps"}  # no draft, verification or probe counted
    step = flops.full_flops(model.config, context).total  # what the FLOPs reports call a full-depth token
    assert decoding_flops(model, full.work, context) == pytest.approx(full.work["full_steps"] * step)

    works = {}
    for exits in ((1, 1), (2, 2), (1, 2)):  # one exit, the other, and rows of both exits in the same rounds
        engine = Engine(model, slots=2, max_speculations=3)
        for prompt, e in zip(([3, 1, 4], [1, 5, 9, 2]), exits):
            engine.add(Request(prompt, max_new_tokens=12, draft_exit=e, num_speculations=3))
        engine.run()
        works[exits] = engine.work
    for e in (1, 2):
        work = works[e, e]
        assert work["draft_layers"] == e * work["draft_layer_tokens"]
        assert work["verify_layers"] == (L - e) * work["verify_layer_tokens"]
    mixed = works[1, 2]  # each row's own layers: between what all-exit-1 and all-exit-2 rows would count
    assert 1 * mixed["draft_layer_tokens"] < mixed["draft_layers"] < 2 * mixed["draft_layer_tokens"]
    assert (L - 2) * mixed["verify_layer_tokens"] < mixed["verify_layers"] < (L - 1) * mixed["verify_layer_tokens"]
