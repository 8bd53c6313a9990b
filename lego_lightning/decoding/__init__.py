"""Decoding: one engine for every way this library turns a model into text.

* :mod:`~lego_lightning.decoding.cache`: the KV cache of slots;
* :mod:`~lego_lightning.decoding.attention`: the one attention path (any layers, any slots, any positions);
* :mod:`~lego_lightning.decoding.sampling`: greedy and sampled choices, each request's random stream;
* :mod:`~lego_lightning.decoding.request`: a request, its events and its completion;
* :mod:`~lego_lightning.decoding.state`: a request in a slot, as the engine keeps it;
* :mod:`~lego_lightning.decoding.policies`: prefill, full depth, routed and self-speculative rounds;
* :mod:`~lego_lightning.decoding.engine`: continuous batching over the slots;
* :mod:`~lego_lightning.decoding.generate`: ``generate``, a batch in and a batch out;
* :mod:`~lego_lightning.decoding.speed`: the speed bound of self-speculation and its measured step costs;
* :mod:`~lego_lightning.decoding.auto`: ``draft_exit="auto"`` and ``num_speculations="auto"``, chosen every round.

Nothing here imports Lightning, and the model does not import this package.
"""

from lego_lightning.decoding.auto import AutoDraft, DraftCosts
from lego_lightning.decoding.engine import Engine, measure_draft_costs
from lego_lightning.decoding.generate import Generation, check_decoding, generate, speculation_room
from lego_lightning.decoding.request import Completion, Event, Request
from lego_lightning.decoding.sampling import Sampling
from lego_lightning.decoding.speed import (
    StepCosts,
    acceptance_needed,
    measure_step_costs,
    round_speedup,
    speedup_bound,
    tokens_per_verification,
)

__all__ = [
    "AutoDraft",
    "Completion",
    "DraftCosts",
    "Engine",
    "Event",
    "Generation",
    "Request",
    "Sampling",
    "StepCosts",
    "acceptance_needed",
    "check_decoding",
    "generate",
    "measure_draft_costs",
    "measure_step_costs",
    "round_speedup",
    "speculation_room",
    "speedup_bound",
    "tokens_per_verification",
]
