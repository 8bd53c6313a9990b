"""The priced auto benchmark: each decoding's price is the sum of its rounds' costs in the one table."""

import pytest
import torch

from benchmarks.auto_draft_priced import priced
from tests.decoding.test_auto import COSTS, identity_above
from tests.decoding.test_speculative import drafting_model

PROMPTS = torch.tensor([[3, 1, 4, 1, 5]])


def test_full_depth_is_priced_a_full_step_per_token_after_the_prefills():
    model = drafting_model(0, "rotary", "shared").eval()
    with torch.no_grad():
        price, out, _ = priced(model, PROMPTS, 1, 9, False, COSTS)
    assert len(out[0].tokens) == 9
    assert price == pytest.approx(8 * COSTS.full)  # the first token is the prefill's, not priced


def test_a_drafting_setting_and_auto_are_priced_by_the_rounds_they_ran():
    model = identity_above(drafting_model(0, "rotary", "shared"), 1).eval()  # exit 1's drafts are always kept
    with torch.no_grad():
        price, out, _ = priced(model, PROMPTS, 1, 11, False, COSTS, draft_exit=1, num_speculations=4)
    # 10 tokens after the prefill's: two rounds of 4 kept drafts and the full model's token.
    assert out[0].verifications == 2 and price == pytest.approx(2 * COSTS.seconds(1, 4))
    with torch.no_grad():
        price, out, _ = priced(model, PROMPTS, 1, 11, False, COSTS, draft_exit="auto", num_speculations="auto")
    assert price == pytest.approx(sum(COSTS.seconds(e, k) for e, k in out[0].choices))
    assert price < 10 * COSTS.full  # it learnt to draft, and is priced for it
