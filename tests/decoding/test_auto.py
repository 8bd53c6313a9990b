"""``draft_exit="auto"`` and ``num_speculations="auto"``: the choice each round, its estimates, and exact output."""

import pytest
import torch

from lego_lightning.decoding import Engine, Request, Sampling, generate
from lego_lightning.decoding.auto import (
    FULL_MARGIN,
    PROBE_POSITIONS,
    PROBE_SHARE,
    AutoDraft,
    DraftCosts,
    RoundTimes,
    SharedAcceptance,
    best_length,
    choose_together,
    expected_tokens,
)
from lego_lightning.decoding.engine import measure_draft_costs
from lego_lightning.decoding.speed import speedup_bound, tokens_per_verification
from tests.decoding.test_engine import PROMPTS, SETTINGS, no_cache_greedy
from tests.decoding.test_speculative import (
    chi_square_p_value,
    drafting_model,
    exact_distribution,
    small_vocabulary_model,
)
from tests.model.test_early_exit import V

DRAFT = {1: 1.0, 2: 2.0}  # a draft step costs its layers
# A verification costs the layers above the exit over K + 1 positions, a tenth of a layer each beyond the first.
VERIFY = {e: tuple((4 - e) * (1 + 0.1 * K) for K in range(1, 5)) for e in (1, 2)}
# Round costs of a 4-layer model with exits after layers 1 and 2, K up to 4.
COSTS = DraftCosts(rounds={e: tuple(K * DRAFT[e] + VERIFY[e][K - 1] for K in range(1, 5)) for e in (1, 2)}, full=4.0)


def best_by_the_bound(acceptance: dict[int, float], costs: DraftCosts, lengths=range(1, 5)):
    """The setting of highest speedup_bound, found by brute force; None (full depth) unless one's bound is above
    the margin drafting must promise."""
    best, best_bound = (None, 0), FULL_MARGIN
    for e, a in acceptance.items():
        for K in lengths:
            bound = speedup_bound(a, K, DRAFT[e], VERIFY[e][K - 1], costs.full)
            if bound > best_bound:
                best, best_bound = (e, K), bound
    return best


@pytest.mark.parametrize("acceptance", [0.05, 0.3, 0.6, 0.8, 0.95, 1.0])
def test_the_choice_is_the_setting_of_highest_speedup_bound(acceptance):
    auto = AutoDraft(exits=(1, 2), lengths=(1, 2, 3, 4), allow_full=True)
    for e, a in ((1, acceptance), (2, min(1.0, acceptance + 0.1))):
        auto.observe(e, 1000 * a, 1000)  # enough observations that the prior no longer counts
    estimates = {e: auto.acceptance(e) for e in (1, 2)}
    assert auto.choose(COSTS, remaining=100) == best_by_the_bound(estimates, COSTS)


def test_requests_that_share_a_round_choose_one_setting_of_highest_expected_speed_for_all():
    autos = [AutoDraft(exits=(1, 2), lengths=(1, 2, 3, 4), allow_full=True) for _ in range(3)]
    for auto, (a1, a2) in zip(autos, [(0.9, 0.95), (0.2, 0.6), (0.5, 0.99)]):
        auto.observe(1, 1000 * a1, 1000)
        auto.observe(2, 1000 * a2, 1000)
    remaining = [100, 2, 100]  # the second has room for one draft at most
    best, best_rate = (None, 0), 3 / COSTS.full * FULL_MARGIN
    for e in (1, 2):
        for K in range(1, 5):
            tokens = sum(sum(a.acceptance(e) ** i for i in range(min(K, r - 1) + 1)) for a, r in zip(autos, remaining))
            rate = tokens / (K * DRAFT[e] + VERIFY[e][K - 1])
            if rate > best_rate:
                best, best_rate = (e, K), rate
    assert choose_together(autos, COSTS, remaining) == best != (None, 0)
    assert all(a.choices == [best] for a in autos)


@pytest.mark.parametrize("acceptance", [0.0, 0.37, 0.9, 1.0])
def test_the_closed_form_of_the_expected_tokens_is_tokens_per_verification(acceptance):
    for K in range(1, 9):
        assert expected_tokens(acceptance, K) == pytest.approx(tokens_per_verification(acceptance, K), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_the_best_length_is_the_brute_force_best_of_the_closed_form(seed):
    rng = torch.Generator().manual_seed(seed)
    acceptance = torch.rand(6, generator=rng).tolist()
    room = torch.randint(0, 7, (6,), generator=rng).tolist()
    seconds = tuple(1.0 + 0.3 * K + float(torch.rand(1, generator=rng)) for K in range(1, 7))
    lengths = (1, 2, 3, 4, 5, 6)
    rates = {
        k: sum(expected_tokens(a, min(k, n)) for a, n in zip(acceptance, room)) / seconds[k - 1]
        for k in lengths
        if max(1, max(room)) >= k
    }
    best = max(rates, key=rates.get)
    rate, length = best_length(acceptance, room, seconds, lengths)
    assert length == best and rate == pytest.approx(rates[best], rel=1e-12)
    assert best_length([0.9], [0], seconds, (2, 3)) == (-1.0, 2)  # no K fits a request at its end


def test_no_drafting_is_chosen_where_no_exit_pays_and_drafts_stop_at_the_requests_end():
    auto = AutoDraft(exits=(1, 2), lengths=(1, 2, 3, 4), allow_full=True)
    auto.observe(1, 0.0, 50)
    auto.observe(2, 1.0, 50)
    assert auto.choose(COSTS, remaining=100) == (None, 0)
    fixed = AutoDraft(exits=(1,), lengths=(1, 2, 3, 4), allow_full=False)  # only K is auto: it always drafts
    fixed.observe(1, 0.0, 50)
    assert fixed.choose(COSTS, remaining=100) == (1, 1)
    fixed.observe(1, 1000.0, 1000)
    assert fixed.choose(COSTS, remaining=100) == (1, 4)
    assert fixed.choose(COSTS, remaining=3) == (1, 2)  # two drafts and the round's own token end it


def bound_of(acceptance):
    """Exit 1's best speed-up bound over full depth at ``acceptance`` (COSTS, K up to 4)."""
    return max(speedup_bound(acceptance, K, DRAFT[1], VERIFY[1][K - 1], COSTS.full) for K in range(1, 5))


def acceptance_at_bound(target):
    lo, hi = 0.0, 1.0
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if bound_of((lo + hi) / 2) < target else (lo, (lo + hi) / 2)
    return lo


@pytest.mark.parametrize("bound", [1.02, 1.08])
def test_drafting_is_chosen_over_full_depth_only_where_it_promises_the_margin_more(bound):
    auto = AutoDraft(exits=(1,), lengths=(1, 2, 3, 4), allow_full=True)
    a = acceptance_at_bound(bound)
    auto.observe(1, 1e6 * a, 1e6)  # the prior no longer counts
    assert bound_of(auto.acceptance(1)) == pytest.approx(bound, abs=1e-3)
    assert (auto.choose(COSTS, remaining=100) == (None, 0)) == (bound < FULL_MARGIN)


# Three exits, each deeper one's round dearer by half a layer, a draft step a fifth of one.
COSTS3 = DraftCosts(rounds={e: tuple(1.5 + 0.5 * e + 0.2 * K for K in range(4)) for e in (1, 2, 3)}, full=4.0)


def test_probes_read_the_exits_that_might_beat_the_choice_not_those_known_to_lose():
    auto = AutoDraft(exits=(1, 2, 3), lengths=(1, 2, 3, 4), allow_full=True, probe_every=1)
    auto.observe(1, 900.0, 1000)  # drafts well, and that is known
    auto.observe(3, 0.0, 1000)  # never agrees, and that is known
    # Exit 2, never seen: at an optimistic acceptance it would beat exit 1.
    assert auto.choose(COSTS3, remaining=100) == (1, 4)
    assert auto.probing == (2,)
    auto.observe(2, 500.0, 1000)  # now known to lose to exit 1 as well
    auto.choose(COSTS3, remaining=100)
    assert auto.probing == ()


def test_probes_spend_no_more_than_their_share_of_the_rounds():
    auto = AutoDraft(exits=(1, 2), lengths=(1, 2, 3, 4), allow_full=True, probe_every=1)
    rng = torch.Generator().manual_seed(0)
    reads, rounds_cost = 0, 0.0
    for _ in range(300):  # both exits about as good, so both stay worth reading
        e, K = auto.choose(COSTS, remaining=100)
        rounds_cost += COSTS.in_draft_steps(e, K)
        reads += PROBE_POSITIONS * len(auto.probing)
        for probed in auto.probing:
            auto.observe(probed, float(torch.rand(1, generator=rng)), 1)
        if e is not None:
            kept = int(torch.randint(0, K + 1, (1,), generator=rng))
            auto.observe(e, kept, kept + (kept < K))
    assert reads > 0
    assert reads <= PROBE_POSITIONS * 3 + PROBE_SHARE * rounds_cost  # three exits' reads at first, then the share


def test_an_exit_not_read_for_a_while_is_read_again():
    auto = AutoDraft(exits=(1, 2), lengths=(1, 2, 3, 4), allow_full=True, probe_every=1)
    auto.observe(1, 80.0, 100)
    auto.observe(2, 50.0, 100)  # read once, mediocre: not worth reading again soon
    probed_at = []
    for round_ in range(300):
        assert auto.choose(COSTS3, remaining=100) == (1, 4)
        auto.observe(1, 3.2, 4)  # exit 1 as good as ever
        if 2 in auto.probing:
            probed_at.append(round_)
            auto.observe(2, 1.0, 2)  # then it agrees: the text changed under it
    assert probed_at and probed_at[0] > 10  # read again, what it knew of exit 2 having aged


def test_at_full_depth_a_request_reads_the_exit_its_engines_pool_says_pays_beyond_its_budget():
    def at_full_depth(shared):
        auto = AutoDraft(exits=(1, 2), lengths=(1, 2, 3, 4), allow_full=True, shared=shared)
        auto.budget = 0.0  # spent: its own probes read nothing this round
        for e in (1, 2):
            auto.observe(e, 0.0, 4)  # its first reads all missed: a hard token
        assert auto.choose(COSTS, remaining=100, clock=0) == (None, 0)
        return auto.probing

    paying, losing = SharedAcceptance(), SharedAcceptance()
    paying.observe(2, 90.0, 100)  # the engine's other requests drafted well from exit 2
    losing.observe(2, 10.0, 100)
    assert at_full_depth(paying) == (2,)
    assert at_full_depth(losing) == ()  # the pool knows no exit that pays: the budget rules alone
    assert at_full_depth(None) == ()  # a request that depends on no other


def test_only_requests_choosing_both_pool_what_they_measure():
    request = Request([3, 1, 4], max_new_tokens=4, draft_exit="auto", num_speculations="auto")
    pool = SharedAcceptance()
    both = AutoDraft.of(request, (1, 2), 4, pool)
    both.observe(1, 3.0, 4)
    assert both.shared is pool and pool.acceptance(1) == 0.75 and pool.acceptance(2) is None
    for one in ({"draft_exit": "auto", "num_speculations": 2}, {"draft_exit": 1, "num_speculations": "auto"}):
        assert AutoDraft.of(Request([3, 1, 4], max_new_tokens=4, **one), (1, 2), 4, pool).shared is None
    model = drafting_model(0, "rotary", "shared")
    engine = Engine(model, 2, max_speculations=3, draft_costs=SWITCHING)
    engine.add(Request(PROMPTS[0], max_new_tokens=8, draft_exit="auto", num_speculations=2))
    engine.run()
    assert not engine.shared_acceptance[False].seen  # choosing one of the two, it left the pool alone
    engine.add(Request(PROMPTS[0], max_new_tokens=8, draft_exit="auto", num_speculations="auto"))
    engine.run()
    assert engine.shared_acceptance[False].seen and not engine.shared_acceptance[True].seen  # greedy's own


def test_requests_choosing_together_probe_in_the_engines_rounds_whatever_their_own_count():
    young, old = (AutoDraft(exits=(1, 2, 3), lengths=(1, 2, 3, 4), allow_full=True) for _ in range(2))
    for _ in range(3):  # three rounds older, the first of which probed by its own count
        old.choose(COSTS3, remaining=100)
    old.budget = young.budget  # as much left to spend: only their counts of rounds tell them apart
    for clock in (9, 10, 11, 12):
        choose_together([young, old], COSTS3, [100, 100], clock)
        assert bool(young.probing) == bool(old.probing) == (clock % 4 == 0)


def test_measured_costs_are_corrected_by_the_median_of_the_rounds_each_kind_really_took():
    times = RoundTimes(COSTS)
    assert times.costs is COSTS  # nothing observed yet: the table as measured
    for ratio in (1.2, 1.2, 9.0):  # drafting rounds at 1.2 times the table, one in a slow second of the machine
        times.observe(1, 2, ratio * COSTS.rounds[1][1])
    times.observe(None, 0, 0.9 * COSTS.full)
    assert times.costs.rounds[2][3] == pytest.approx(1.2 * COSTS.rounds[2][3])
    assert times.costs.full == pytest.approx(0.9 * COSTS.full)
    assert times.table is COSTS  # the measured table (shared by every engine of the process) stays as it was


def test_drafting_that_the_rounds_show_dearer_than_the_table_gives_way_to_full_depth():
    auto = AutoDraft(exits=(1,), lengths=(1, 2, 3, 4), allow_full=True)
    auto.observe(1, 1e6 * acceptance_at_bound(1.08), 1e6)  # by the table, drafting is 8% faster than full depth
    times = RoundTimes(COSTS)
    assert auto.choose(times.costs, remaining=100) != (None, 0)
    times.observe(1, 4, 1.1 * COSTS.rounds[1][3])  # but its rounds take a tenth longer than the table says
    assert auto.choose(times.costs, remaining=100) == (None, 0)


def test_the_estimate_forgets_so_a_request_follows_its_text():
    auto = AutoDraft(exits=(1,), lengths=(1,), allow_full=True)
    auto.observe(1, 40.0, 40)  # a stretch the exit drafts well
    assert auto.acceptance(1) > 0.95 and auto.choose(COSTS, remaining=100) == (1, 1)
    for _ in range(100):
        auto.observe(1, 0.0, 1)  # then one it does not
    assert auto.acceptance(1) < 0.2 and auto.choose(COSTS, remaining=100) == (None, 0)


def identity_above(model, exit_layer):
    """The layers above ``exit_layer`` add nothing to the residual stream: its shared head is the final one."""
    with torch.no_grad():
        for block in model.blocks[exit_layer:]:
            for lin in block.residual_projections():
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
    return model


def test_auto_drafts_long_from_an_exit_that_always_agrees_and_not_at_all_from_one_that_never_does():
    agreeing = identity_above(drafting_model(0, "rotary", "shared"), 1)
    engine = Engine(agreeing, slots=1, max_speculations=4, draft_costs=COSTS)
    engine.add(Request([3, 1, 4, 1, 5], max_new_tokens=18, draft_exit="auto", num_speculations="auto"))
    (done,) = engine.run().values()
    assert done.tokens == no_cache_greedy(agreeing, [3, 1, 4, 1, 5], 18)
    assert done.choices[-2] == (1, 4) and done.accepted == done.drafts  # learnt: exit 1, as long as it may
    assert engine.work["probe_heads"] > 0  # the other exit read now and then, and counted

    disagreeing = drafting_model(1, "rotary", "separate")
    with torch.no_grad():  # heads of their own, unrelated to the final one: drafts are refused
        for head in disagreeing.heads[:-1]:
            head.proj.weight.normal_(generator=torch.Generator().manual_seed(0))
    engine = Engine(disagreeing, slots=1, max_speculations=4, draft_costs=COSTS)
    engine.add(Request([3, 1, 4, 1, 5], max_new_tokens=18, draft_exit="auto", num_speculations="auto"))
    (done,) = engine.run().values()
    assert done.tokens == no_cache_greedy(disagreeing, [3, 1, 4, 1, 5], 18)
    assert done.choices[-4:] == [(None, 0)] * 4  # learnt that no exit pays: full depth
    drafting_rounds = sum(e is not None for e, _ in done.choices)
    assert done.accepted == 0 and drafting_rounds <= rounds_to_learn(1) + rounds_to_learn(2)


def rounds_to_learn(exit_layer):
    """Rounds of refused drafts before an exit's estimate falls below what pays (probes only shorten it)."""
    auto = AutoDraft(exits=(exit_layer,), lengths=(1, 2, 3, 4), allow_full=True)
    rounds = 0
    while auto.choose(COSTS, remaining=100) != (None, 0):
        auto.observe(exit_layer, 0.0, 1)
        rounds += 1
    return rounds


def auto_requests():
    """The engine tests' prompts and settings, drafting with every mix of auto and fixed."""
    drafts = [
        {"draft_exit": "auto", "num_speculations": "auto"},
        {"draft_exit": "auto", "num_speculations": 2},
        {"draft_exit": 1, "num_speculations": "auto"},
        {},
        {"draft_exit": "auto", "num_speculations": "auto"},
        {"draft_exit": 2, "num_speculations": 3},
        {"draft_exit": "auto", "num_speculations": "auto"},
    ]
    return [Request(p, **s, **d) for p, s, d in zip(PROMPTS, SETTINGS, drafts)]


# Costs at which drafting pays at the prior's acceptance, and stops paying once it falls: choices change.
SWITCHING = DraftCosts(rounds={1: (1.4, 1.7, 2.0, 2.3), 2: (1.5, 2.1, 2.7, 3.3)}, full=1.6)


@pytest.mark.parametrize("positions", ["rotary", "llama"])
def test_requests_choosing_alone_get_their_own_tokens_in_a_batch_and_those_choosing_together_the_full_models(
    positions,
):
    model = drafting_model(0, positions, "shared")
    todo = auto_requests()

    def alone(request):
        engine = Engine(model, 1, max_speculations=4, draft_costs=SWITCHING)
        engine.add(request)
        return next(iter(engine.run().values()))

    engine = Engine(model, 3, max_speculations=4, draft_costs=SWITCHING)
    ids = [engine.add(r) for r in todo[:4]]
    done = {e.id: e.completion for _ in range(2) for e in engine.step() if e.finished}
    ids += [engine.add(r) for r in todo[4:]]  # joining mid-run
    done |= engine.run()
    changed = 0
    for request_id, request in zip(ids, todo):
        got, expected = done[request_id], alone(request)
        if request.temperature == 0:  # the full model's own greedy tokens, whatever was chosen
            assert got.tokens == no_cache_greedy(model, list(request.prompt), len(got.tokens))
        # One that chooses the exit or K alone depends on nothing else in the batch: sampled ones included.
        if (request.draft_exit, request.num_speculations) != ("auto", "auto"):
            assert got.tokens == expected.tokens, request_id
            assert got.choices == expected.choices
            assert (got.drafts, got.accepted) == (expected.drafts, expected.accepted)
        changed += len(set(got.choices)) > 1
    assert changed >= 2  # the choice changed mid-sequence
    rounds = [set(done[i].choices) for i in ids]
    assert len(set().union(*rounds)) >= 3  # in the batch, requests chose differently
    assert engine.work["probe_heads"] > 0


# Drafting from exit 1 pays where its acceptance is above 0.4 (K=1) or 0.57 (K=2): requests start drafting at the
# prior's 0.5, then switch as they learn it.
TIE = DraftCosts(rounds={1: (1.0, 1.3)}, full=0.75)


def test_sampled_requests_choosing_together_follow_the_full_models_distribution():
    vocab, n, draws = 6, 4, 3000
    model = small_vocabulary_model(vocab)
    prompt, sampling = [1, 4, 2], Sampling(temperature=1.0)
    engine = Engine(model, 16, max_speculations=2, draft_costs=TIE)  # continuous batching: batches of all kinds
    auto = {"draft_exit": "auto", "num_speculations": "auto"}
    ids = [engine.add(Request(prompt, max_new_tokens=n, temperature=1.0, seed=i, **auto)) for i in range(draws)]
    done = engine.run()
    choices = [done[i].choices for i in ids]
    assert sum(len(set(c)) > 1 for c in choices) > draws / 2  # choices that change mid-sequence
    assert {(None, 0), (1, 1)} <= {x for c in choices for x in c}  # full depth and drafts, both
    tokens = torch.tensor([done[i].tokens for i in ids])
    index = (tokens * vocab ** torch.arange(n - 1, -1, -1)).sum(1)
    counts = torch.bincount(index, minlength=vocab**n).float()
    exact = exact_distribution(model, torch.tensor([prompt]), n, sampling, exit_layer=3)
    p_value, dof = chi_square_p_value(counts, exact * draws)
    assert dof >= 10 and p_value > 1e-3, (p_value, dof)
    # The test can fail: the draft exit's own samples are told apart from the full model's.
    p_shallow, _ = chi_square_p_value(counts, exact_distribution(model, torch.tensor([prompt]), n, sampling, 1) * draws)
    assert p_shallow < 1e-6


def test_generate_with_auto_gives_full_depths_greedy_tokens():
    model = drafting_model(3, "rotary", "shared")
    prompt = torch.randint(1, V, (4, 5), generator=torch.Generator().manual_seed(0))
    full = generate(model, prompt, 10)
    auto = generate(model, prompt, 10, draft_exit="auto", num_speculations="auto", max_speculations=3)
    assert torch.equal(auto.tokens, full.tokens)
    assert auto.work["probe_heads"] > 0  # the exits were read, whether or not one paid on this machine
    # What each row chose, round by round: its drafting rounds are the rounds it verified.
    assert len(auto.choices) == 4
    for row, choices in enumerate(auto.choices):
        assert all(e in (None, *model.exit_layers[:-1]) and (e is None or 1 <= k <= 3) for e, k in choices)
        assert sum(e is not None for e, _ in choices) == int(auto.verifications[row])
    assert generate(model, prompt, 10, draft_exit=1, num_speculations=2).choices is None


def test_an_engine_corrects_measured_costs_by_its_rounds_over_every_slot_and_leaves_given_costs_as_they_are():
    model = drafting_model(0, "rotary", "shared")
    auto = {"draft_exit": "auto", "num_speculations": "auto"}
    measured, given = Engine(model, 2, max_speculations=3), Engine(model, 2, max_speculations=3, draft_costs=SWITCHING)
    for engine in (measured, given):
        for prompt in PROMPTS[:3]:  # the third waits for a slot: the last rounds run one row, not timed
            engine.add(Request(prompt, max_new_tokens=8, **auto))
        engine.run()
        engine.add(Request(PROMPTS[0], max_new_tokens=8, **auto))
        engine.step()  # admitted: a row to ask the costs for
    times = measured.round_times[False]
    assert times.table is measure_draft_costs(model, 2, 3)  # the process's measured table, shared, left as it was
    assert len(times.drafting) + len(times.full) > 0  # rounds over both slots, timed
    assert measured.draft_costs(measured.slots[0]) is times.costs
    assert given.round_times == {} and given.draft_costs(given.slots[0]) is SWITCHING


def test_measured_costs_are_cached_and_cover_every_exit_and_length():
    model = drafting_model(0, "rotary", "shared")
    costs = measure_draft_costs(model, slots=2, cap=3, repeats=1)
    assert set(costs.rounds) == {1, 2} and all(len(costs.rounds[e]) == 3 for e in (1, 2))
    assert all(t > 0 for t in [costs.full, *costs.rounds[1], *costs.rounds[2]])
    assert measure_draft_costs(model, slots=2, cap=3, repeats=1) is costs  # nobody pays twice
    assert measure_draft_costs(model, slots=1, cap=3, repeats=1) is not costs  # another batch size: its own
    sampled = measure_draft_costs(model, slots=2, cap=3, sampling=Sampling(1.0, None, 0.9), repeats=1)
    assert sampled is not costs  # sampled: its own
    with pytest.raises(ValueError, match=r"max_seq_len=24 leaves no room to time a round of 20 drafts"):
        measure_draft_costs(model, slots=2, cap=20)


def test_bad_auto_settings_are_named_before_any_work():
    model = drafting_model(0, "rotary", "shared")
    one_exit = drafting_model(0, "rotary", "shared")
    one_exit.config.stages = one_exit.config.stages[-1:]
    engine = Engine(model, slots=1, max_speculations=0)
    with pytest.raises(ValueError, match=r"num_speculations='auto' chooses K up to this engine's max_speculations=0"):
        engine.add(Request([1], max_new_tokens=3, draft_exit="auto", num_speculations="auto"))
    with pytest.raises(ValueError, match=r"num_speculations='auto' .* it needs a draft_exit"):
        engine.add(Request([1], max_new_tokens=3, num_speculations="auto"))
    with pytest.raises(ValueError, match=r"max_speculations=0: num_speculations='auto' chooses K up to it"):
        generate(model, torch.ones(1, 2, dtype=torch.long), 3, draft_exit=1, num_speculations="auto",
                 max_speculations=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"draft_exit='auto' chooses among the exits before the last, .* one exit"):
        generate(one_exit, torch.ones(1, 2, dtype=torch.long), 3, draft_exit="auto")
    with pytest.raises(ValueError, match=r"draft_exit='best' is not an exit before the last"):
        generate(model, torch.ones(1, 2, dtype=torch.long), 3, draft_exit="best")
    assert not engine.busy  # nothing queued, nothing decoded
