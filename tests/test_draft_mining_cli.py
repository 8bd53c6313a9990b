"""configs/pretrained/draft_mining.yaml and the phases it uses: disagreement mining, distillation, draft-only training.

On a tiny random 4-layer GPT-2 that transformers saves with a tokenizer: the draft exit goes
after layer 1 (a quarter of 4), a separate head copied from the final one.
"""

import re
from pathlib import Path

import pytest
import torch
import transformers

from lego_lightning import ExitTransformer, Phase, PhasedExitLM
from lego_lightning.cli import LegoCLI
from lego_lightning.decoding import generate
from lego_lightning.model.distillation import linear_distillation
from lego_lightning.model.lean_loss import IGNORE_INDEX, linear_cross_entropy
from lego_lightning.model.pretrained import converted_state
from tests.helpers import cli_args, two_rank_fit
from tests.test_cli_errors import fails_cleanly
from tests.test_pretrained_cli import save_with_tokenizer

CONFIG = "pretrained/draft_mining.yaml"
RUN = ("--data.seq_len", "16", "--trainer.limit_train_batches", "3")


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=304)
    return save_with_tokenizer(transformers.GPT2LMHeadModel(config), tmp_path_factory.mktemp("gpt2_4"), corpus)


def fit(checkpoint: Path, corpus: Path, logs: Path, *extra: str, run: bool = True) -> LegoCLI:
    args = cli_args("fit", CONFIG, corpus, logs, "--model.pretrained", str(checkpoint), *RUN, *extra)
    return LegoCLI(args=args if run else args[1:], run=run)


@pytest.fixture(scope="module")
def fitted(checkpoint, corpus, tmp_path_factory) -> LegoCLI:
    return fit(checkpoint, corpus, tmp_path_factory.mktemp("draft_mining"), "--trainer.max_epochs", "2")


def original(checkpoint: Path) -> ExitTransformer:
    """The checkpoint as the config builds it before training: exit 1's head a copy of the final one."""
    return ExitTransformer.from_pretrained(checkpoint, exits=[1], head_sharing="separate").eval()


def exit_tokens(model: ExitTransformer, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        return {k: logits.float() for k, logits in model(input_ids).items()}


def training_blocks(cli: LegoCLI) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training block's input ids and targets, in index order."""
    dataset = cli.datamodule.train_dataset
    items = sorted((dataset[i] for i in range(len(dataset))), key=lambda item: int(item["index"]))
    return torch.stack([i["input_ids"] for i in items]), torch.stack([i["targets"] for i in items])


def test_only_the_draft_head_trains_and_the_output_stays_bit_for_bit(checkpoint, fitted):
    module, model = fitted.model, fitted.model.model.eval()
    assert fitted.trainer.global_step == 6 and model.exit_layers == (1, 4)
    assert module.monitor == "val/exit1/agree" and "val/exit1/agree" in fitted.trainer.callback_metrics
    start = original(checkpoint)
    loaded, after = start.state_dict(), model.state_dict()
    assert all(torch.equal(after[k], loaded[k]) for k in after if not k.startswith("heads.0."))
    assert not torch.equal(after["heads.0.proj.weight"], loaded["heads.0.proj.weight"])
    # Self-speculative decoding from the trained draft gives the untouched model's own greedy tokens.
    prompts = torch.randint(0, 300, (3, 6), generator=torch.Generator().manual_seed(0))
    before = generate(start, prompts, 12)
    drafted = generate(model, prompts, 12, draft_exit=1, num_speculations=3)
    assert torch.equal(drafted.tokens, before.tokens)
    assert int(drafted.drafts.sum()) > 0


def test_the_mined_tokens_are_where_the_draft_exits_greedy_token_is_not_the_final_exits(checkpoint, fitted):
    # Mined once, when the phase started: with the model as loaded.
    input_ids, targets = training_blocks(fitted)
    logits = exit_tokens(original(checkpoint), input_ids)
    disagree = (logits[1].argmax(-1) != logits[4].argmax(-1)) & (targets != IGNORE_INDEX)
    mined = fitted.model.hard_mask
    assert torch.equal(mined, disagree)
    assert 0 < mined.float().mean() < 1


def test_the_soft_selection_mines_the_lowest_probabilities_of_the_final_exits_token(checkpoint, corpus, tmp_path):
    phases = "[{train: [exit first], loss_weights: {first: 1.0}, tokens: disagree_soft, hard_ratio: 0.5, distill: 1.0}]"
    extra = ("--model.phases", phases, "--data.calibration_samples", "16", "--trainer.max_epochs", "1")
    cli = fit(checkpoint, corpus, tmp_path, *extra)
    input_ids, targets = training_blocks(cli)
    logits = exit_tokens(original(checkpoint), input_ids)
    probability = logits[1].softmax(-1).gather(-1, logits[4].argmax(-1, keepdim=True)).squeeze(-1)
    valid, mined = targets != IGNORE_INDEX, cli.model.hard_mask
    assert not mined[~valid].any()
    # Every mined token's probability is below every kept one's: one threshold splits them.
    assert probability[mined].max() < probability[valid & ~mined].min()
    assert 0.2 < mined[valid].float().mean() < 0.8  # half of the held-out tokens fall below the threshold


def test_a_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(checkpoint, corpus, tmp_path, fitted):
    half = fit(checkpoint, corpus, tmp_path, "--trainer.max_epochs", "1")
    resumed = fit(
        checkpoint,
        corpus,
        tmp_path,
        "--trainer.max_epochs",
        "2",
        "--ckpt_path",
        half.trainer.checkpoint_callback.last_model_path,
    )
    assert resumed.trainer.global_step == fitted.trainer.global_step == 6
    assert torch.equal(resumed.model.hard_mask, fitted.model.hard_mask)
    for (name, a), b in zip(fitted.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_under_ddp_both_ranks_mine_the_same_tokens_and_end_with_the_same_weights(checkpoint, corpus, tmp_path):
    extra = ("--model.pretrained", str(checkpoint), "--data.seq_len", "16", "--trainer.max_epochs", "1")
    ranks = two_rank_fit(CONFIG, corpus, tmp_path, "ddp", *extra)
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["hard_mask"] is not None and torch.equal(ranks[0]["hard_mask"], ranks[1]["hard_mask"])
    weights = ranks[0]["weights"]
    assert all(torch.equal(weights[k], ranks[1]["weights"][k]) for k in weights)
    loaded = converted_state(checkpoint, original(checkpoint), False)
    assert all(torch.equal(weights[f"model.{k}"], v) for k, v in loaded.items() if not k.startswith("heads.0."))


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ("[{train: [exit first], loss_weights: {first: 1.0}, distill: 1.0, distill_temperature: 0}]",
         r"phases\[0\].distill_temperature=0 is not allowed: a number > 0"),
        ("[{train: [exit 3], loss_weights: {first: 1.0}}]",
         r"phases\[0\].train: 'exit 3' is not an exit of this phase; its exits follow layers \(1, 4\)"),
        ("[{train: [exit first], loss_weights: {first: 1.0}, tokens: disagree, agree_with: first}]",
         r"phases\[0\].agree_with='first' is exit 1, the same exit as hard_exit='first'"),
        ("[{train: [exit first], loss_weights: {first: 1.0}, distill: {last: 1.0}}]",
         r"phases\[0\].distill names exit 4, which is not shallower than distill_from='last'"),
    ],
)  # fmt: skip
def test_bad_draft_mining_plans_end_with_one_line_naming_the_field(
    checkpoint, corpus, tmp_path, capsys, phases, message
):
    args = cli_args("fit", CONFIG, corpus, tmp_path, "--model.pretrained", str(checkpoint), "--model.phases", phases)
    err = fails_cleanly(capsys, args)
    assert len(re.findall(message, err)) == 1, err
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before anything trained


def tiny_plan(**phase) -> PhasedExitLM:
    torch.manual_seed(0)
    plan = [Phase(layers=3, train=["exit 1"], loss_weights={1: 1.0}, **phase)]
    stages = [{"layers": (1, 1)}, {"layers": (2, 3)}]
    return PhasedExitLM(
        phases=plan, stages=stages, head_sharing="separate", vocab_size=40, d_model=16, n_heads=2, max_seq_len=8
    )


@pytest.mark.parametrize(
    ("share", "target", "temperature"), [(1.0, "softmax", 2.0), (0.25, "softmax", 1.0), (1.0, "greedy", 1.0)]
)
def test_a_distilling_exits_loss_is_its_share_of_distillation_and_the_rest_cross_entropy(share, target, temperature):
    module = tiny_plan(distill=share, distill_target=target, distill_temperature=temperature)
    input_ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(2))
    targets[0, :3] = IGNORE_INDEX
    got = module.exit_losses(input_ids, targets)
    assert set(got) == {1}  # only the weighted exit has a loss; the teacher runs without one
    hidden = module.model.hidden_states(input_ids, [1, 3])
    student, teacher = module.model.head(1), module.model.head(3)
    x, teacher_x = student.norm(hidden[1]).flatten(0, 1), teacher.norm(hidden[3]).flatten(0, 1).detach()
    flat = targets.flatten()
    if target == "greedy":
        teacher_tokens = (teacher_x @ teacher.proj.weight.t()).argmax(-1).masked_fill(flat == IGNORE_INDEX, -100)
        distilled = linear_cross_entropy(x, student.proj.weight, teacher_tokens)
    else:
        distilled = linear_distillation(x, student.proj.weight, teacher_x, teacher.proj.weight, flat, temperature)
    data = linear_cross_entropy(x, student.proj.weight, flat)
    torch.testing.assert_close(got[1], share * distilled + (1 - share) * data)
    got[1].backward()  # the gradient reaches the student's head and nothing of the teacher or the trunk
    assert student.proj.weight.grad is not None and student.proj.weight.grad.abs().sum() > 0
    assert teacher.proj.weight.grad is None and module.model.blocks[2].mlp.proj.weight.grad is None


def test_a_plan_on_the_command_line_replaces_the_configs_whole(checkpoint, corpus, tmp_path):
    plain = "[{train: [exit first], loss_weights: {first: 1.0}, max_epochs: 2}]"
    cli = fit(checkpoint, corpus, tmp_path, "--model.phases", plain, run=False)
    phase = cli.model.plan[0].phase
    # Nothing of the config's phase is merged in: its tokens, distillation and exits are the defaults again.
    assert (phase.tokens, phase.distill, phase.hard_exit, phase.max_epochs) == ("all", 0.0, None, 2)
    assert not cli.model.plan[0].mines and cli.model.plan[0].distill == {}


def test_lego_generate_drafts_from_the_trained_checkpoint_and_writes_the_untouched_models_text(
    checkpoint, fitted, tmp_path
):
    from tests.test_generate_cli import lego_generate

    prompts = [a for p in ("the game began in", "in 1990 the") for a in ("--prompt", p)]
    drafted = lego_generate(
        "--ckpt_path", fitted.trainer.checkpoint_callback.last_model_path, *prompts, "--max_new_tokens", "10",
        "--draft_exit", "1", "--num_speculations", "3", "--output", str(tmp_path / "drafted.jsonl"),
    )  # fmt: skip
    before = lego_generate(
        "--model.pretrained", str(checkpoint), "--model.exits", "[1]", *prompts, "--max_new_tokens", "10",
        "--output", str(tmp_path / "before.jsonl"),
    )  # fmt: skip
    assert [r["text"] for r in drafted] == [r["text"] for r in before]
    assert sum(r["drafts"] for r in drafted) > 0
