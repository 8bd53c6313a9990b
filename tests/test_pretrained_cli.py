"""configs/pretrained/ through the real `lego` CLI, on a tiny random GPT-2 that transformers saves with a tokenizer."""

from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lego_lightning import ExitTransformer, SupervisedExitLM
from lego_lightning.cli import LegoCLI
from lego_lightning.model.early_exit import routed_forward
from lego_lightning.model.pretrained import converted_state
from tests.helpers import PRETRAINED_CONFIGS, cli_args, two_rank_fit


def save_with_tokenizer(model: transformers.PreTrainedModel, folder: Path, corpus: Path) -> Path:
    """``model`` saved by transformers, beside a byte-level BPE of 300 tokens trained on the corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(corpus / "train.txt")], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory) -> Path:
    """A 12-layer GPT-2 (GPT-2 124M's depth) and a byte-level BPE trained on the corpus."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=12, n_head=4, n_positions=64, vocab_size=304)
    return save_with_tokenizer(transformers.GPT2LMHeadModel(config), tmp_path_factory.mktemp("tiny_gpt2"), corpus)


def llama_family(cls: type, config_cls: type, layers: int, **extra) -> transformers.PreTrainedModel:
    sizes = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
    config = config_cls(**sizes, num_hidden_layers=layers, max_position_embeddings=64, vocab_size=304, **extra)
    return cls(config)


# Tiny random checkpoints of every family at several depths (the configs must run unchanged on each).
DEPTHS = {
    "gpt2_2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=304)
    ),
    "llama_4": lambda: llama_family(transformers.LlamaForCausalLM, transformers.LlamaConfig, 4),
    "qwen2_6": lambda: llama_family(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, 6),
    "llama_16": lambda: llama_family(transformers.LlamaForCausalLM, transformers.LlamaConfig, 16),
}
# The exits each config's rule places at each depth (exit_tuning and ashem: at a third and two thirds, rounded).
RULED_EXITS = {
    "pretrained/exit_tuning.yaml": {2: (1, 2), 4: (1, 3, 4), 6: (2, 4, 6), 12: (4, 8, 12), 16: (5, 11, 16)},
    "pretrained/layerskip.yaml": {n: tuple(range(1, n + 1)) for n in (2, 4, 6, 12, 16)},
    "pretrained/ashem.yaml": {2: (1, 2), 4: (1, 4), 6: (2, 6), 12: (4, 12), 16: (5, 16)},
    "pretrained/draft_mining.yaml": {2: (1, 2), 4: (1, 4), 6: (2, 6), 12: (3, 12), 16: (4, 16)},  # a quarter
}


@pytest.fixture(scope="module")
def checkpoints(checkpoint, corpus, tmp_path_factory) -> dict[str, Path]:
    """GPT-2 with 2 and 12 layers, Llama with 4 and 16, Qwen2 with 6: each saved by transformers with a tokenizer."""
    saved = {"gpt2_12": checkpoint}
    for name, build in DEPTHS.items():
        torch.manual_seed(0)
        saved[name] = save_with_tokenizer(build(), tmp_path_factory.mktemp(name), corpus)
    return saved


def fit(config: str, checkpoint: Path, corpus: Path, logs: Path) -> LegoCLI:
    args = cli_args("fit", config, corpus, logs, "--model.pretrained", str(checkpoint), "--data.seq_len", "16")
    return LegoCLI(args=[*args, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2"])


@pytest.fixture(scope="module")
def fitted(checkpoint, corpus, tmp_path_factory):
    """Each pretrained config fitted once (4 steps), shared by the tests that only read the result."""
    runs: dict[str, LegoCLI] = {}

    def of(config: str) -> LegoCLI:
        if config not in runs:
            runs[config] = fit(config, checkpoint, corpus, tmp_path_factory.mktemp(config.replace("/", "_")))
        return runs[config]

    return of


def test_the_pretrained_configs_are_here():
    assert {
        "pretrained/exit_tuning.yaml",
        "pretrained/layerskip.yaml",
        "pretrained/ashem.yaml",
        "pretrained/draft_mining.yaml",
    } <= set(PRETRAINED_CONFIGS)


@pytest.mark.parametrize("config", PRETRAINED_CONFIGS)
def test_each_pretrained_config_trains_on_the_checkpoint_with_its_tokenizer(config, checkpoint, fitted):
    cli = fitted(config)
    model, data = cli.model, cli.datamodule
    assert cli.trainer.global_step == 4
    assert (
        data.kind == "file"
        and data.vocab_size == Tokenizer.from_file(str(checkpoint / "tokenizer.json")).get_vocab_size()
    )
    assert model.config.vocab_size == 304 and model.config.n_layers == 12  # from the checkpoint, not the data
    exits = RULED_EXITS[config][12]  # after layers 4 and 8, as the configs' stages for 12 layers were
    assert model.config.exit_layers == exits
    for k in exits:
        assert torch.isfinite(cli.trainer.callback_metrics[f"val/exit{k}/ppl"])
    assert torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)["global_step"] == 4


@pytest.mark.parametrize("depth", ["gpt2_2", "llama_4", "qwen2_6", "gpt2_12", "llama_16"])
@pytest.mark.parametrize("config", PRETRAINED_CONFIGS)
def test_each_pretrained_config_runs_unchanged_on_any_depth(config, depth, checkpoints, corpus, tmp_path):
    args = cli_args("fit", config, corpus, tmp_path, "--model.pretrained", str(checkpoints[depth]))
    run = ["--data.seq_len", "16", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    cli = LegoCLI(args=[*args, *run, "--trainer.limit_val_batches", "1"])
    module, n_layers = cli.model, int(depth.split("_")[1])
    assert cli.trainer.global_step == 2 and module.config.n_layers == n_layers
    exits = RULED_EXITS[config][n_layers]
    assert module.config.exit_layers == exits
    for k in module.eval_exit_layers:
        assert torch.isfinite(cli.trainer.callback_metrics[f"val/exit{k}/ppl"])
    if config == "pretrained/ashem.yaml":  # the plan's 'exit first' and 'layers above exit first' at this depth
        assert set(module.plan[0].trained) == {("exit", exits[0])}
        assert set(module.plan[1].trained) == {("layer", i) for i in range(exits[0] + 1, n_layers + 1)}
        assert module.plan[1].hard_exit == exits[0] and module.plan[1].loss_weights[n_layers] == 1.0
    if config == "pretrained/layerskip.yaml":  # layer dropout at every layer of this depth, rising to the last
        rates = [float(cli.trainer.callback_metrics[f"train/layer_dropout/{k}"]) for k in range(1, n_layers + 1)]
        assert rates[0] == 0.0 and rates == sorted(rates) and rates[-1] > 0
    if config == "pretrained/exit_tuning.yaml":  # every exit but the final one trains
        assert module.exit_loss_weights == [1.0] * (len(exits) - 1) + [0.0]


def test_exit_tuning_leaves_every_trunk_weight_bit_identical(checkpoint, fitted):
    cli = fitted("pretrained/exit_tuning.yaml")
    model = cli.model.model
    loaded = converted_state(checkpoint, model, saved_exit_heads=False)
    after = model.state_dict()
    trunk = [k for k in after if not k.startswith("heads.")] + [k for k in after if k.startswith("heads.2.")]
    assert len(trunk) == 12 * 12 + 2 + 3  # every layer's tensors, both embeddings, the final head
    assert all(torch.equal(after[k], loaded[k]) for k in trunk)
    # The final exit cannot change, so the best checkpoint and early stopping follow the exits' weighted loss.
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.checkpoint_callback.monitor == "val/loss"
    weighted = metrics["val/exit4/loss"].item() + metrics["val/exit8/loss"].item()  # weights 1, 1 and 0
    assert metrics["val/loss"].item() == pytest.approx(weighted, rel=1e-5)
    # The exits trained their own norm and projection, though GPT-2 ties its final LM head to the embedding.
    assert model.heads[2].proj.weight is model.tok_emb.weight and model.heads[0].proj.weight is not model.tok_emb.weight
    for k in ("heads.0.norm.weight", "heads.0.proj.weight", "heads.1.proj.weight"):
        assert not torch.equal(after[k], loaded[k])


def test_layerskip_trains_the_whole_model(checkpoint, fitted):
    cli = fitted("pretrained/layerskip.yaml")
    model = cli.model.model
    loaded = converted_state(checkpoint, model, saved_exit_heads=False)
    after = model.state_dict()
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], loaded["blocks.0.attn.qkv.weight"])
    assert not torch.equal(after["tok_emb.weight"], loaded["tok_emb.weight"])


@pytest.mark.parametrize(
    ("config", "override", "message"),
    [
        ("exit_tuning", ["--model.head_sharing", "shared"], r"trunk='frozen' with head_sharing='shared' .* leaves"),
        ("layerskip", ["--model.d_model", "48"], r"model.d_model=48 but the pretrained model has d_model=32"),
    ],
)
def test_settings_the_checkpoint_cannot_take_are_refused_before_training(
    checkpoint, corpus, tmp_path, config, override, message
):
    args = cli_args("fit", f"pretrained/{config}.yaml", corpus, tmp_path, "--model.pretrained", str(checkpoint))
    with pytest.raises(ValueError, match=message):
        LegoCLI(args=[*args, *override])


def test_a_checkpoint_of_exit_tuning_validates_with_its_own_weights(checkpoint, corpus, tmp_path, fitted):
    cli = fitted("pretrained/exit_tuning.yaml")
    last = cli.trainer.checkpoint_callback.last_model_path
    trained = {k: v.clone() for k, v in cli.model.state_dict().items()}
    args = cli_args("validate", "pretrained/exit_tuning.yaml", corpus, tmp_path / "v", "--ckpt_path", last)
    again = LegoCLI(args=[*args, "--model.pretrained", str(checkpoint), "--data.seq_len", "16"])
    # The pretrained weights load at set-up; the checkpoint's replace them.
    assert all(torch.equal(v, trained[k]) for k, v in again.model.state_dict().items())
    assert torch.isfinite(again.trainer.callback_metrics["val/exit4/ppl"])


def test_layerskip_trains_under_bf16_mixed_precision(checkpoint, corpus, tmp_path):
    args = cli_args("fit", "pretrained/layerskip.yaml", corpus, tmp_path, "--model.pretrained", str(checkpoint))
    bf16 = ["--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    cli = LegoCLI(args=[*args, "--data.seq_len", "16", *bf16])
    assert cli.trainer.global_step == 2 and cli.trainer.precision == "bf16-mixed"
    assert torch.isfinite(cli.trainer.callback_metrics["val/exit12/ppl"])


def test_a_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(checkpoint, corpus, tmp_path):
    def run(logs, *extra):
        args = cli_args("fit", "pretrained/layerskip.yaml", corpus, logs, "--model.pretrained", str(checkpoint))
        return LegoCLI(args=[*args, "--data.seq_len", "16", "--trainer.limit_train_batches", "2", *extra])

    whole = run(tmp_path / "whole", "--trainer.max_epochs", "2")
    half = run(tmp_path / "half", "--trainer.max_epochs", "1")
    resumed = run(
        tmp_path / "half", "--trainer.max_epochs", "2", "--ckpt_path", half.trainer.checkpoint_callback.last_model_path
    )
    assert resumed.trainer.global_step == whole.trainer.global_step == 4
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_exit_tuning_under_ddp_ends_with_equal_weights_and_the_trunk_untouched(checkpoint, corpus, tmp_path):
    extra = ("--model.pretrained", str(checkpoint), "--data.seq_len", "16", "--trainer.max_epochs", "1")
    ranks = two_rank_fit("pretrained/exit_tuning.yaml", corpus, tmp_path, "ddp", *extra)
    assert ranks[0]["world_size"] == 2
    weights = ranks[0]["weights"]
    assert all(torch.equal(weights[k], ranks[1]["weights"][k]) for k in weights)
    loaded = converted_state(
        checkpoint, ExitTransformer.from_pretrained(checkpoint, exits=[4, 8], head_sharing="separate"), False
    )
    trunk = [k for k in loaded if not k.startswith("heads.") or k.startswith("heads.2.")]
    assert all(torch.equal(weights[f"model.{k}"], loaded[k]) for k in trunk)
    assert not torch.equal(weights["model.heads.0.norm.weight"], loaded["heads.0.norm.weight"])


def test_a_checkpoint_of_the_standard_config_exports_and_comes_back_with_exits(corpus, tmp_path):
    args = cli_args(
        "fit", "standard.yaml", corpus, tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"
    )
    cli = LegoCLI(args=args)
    trained = SupervisedExitLM.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path).model.eval()
    trained.save_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with_exit = ExitTransformer.from_pretrained(tmp_path / "hf", exits=[1]).eval()
    idx = torch.randint(0, trained.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, trained(idx)[3], rtol=1e-5, atol=1e-5)
        assert with_exit.exit_layers == (1, 3)
        torch.testing.assert_close(with_exit(idx)[3], trained(idx)[3])


def test_exit_tuning_without_a_checkpoint_says_it_needs_one(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"trunk='frozen' .* needs model.pretrained"):
        LegoCLI(args=cli_args("fit", "pretrained/exit_tuning.yaml", corpus, tmp_path))


def test_ashem_mines_hard_tokens_at_a_pretrained_exit_and_trains_only_the_layers_above(checkpoint, corpus, tmp_path):
    # configs/pretrained/ashem.yaml's plan, one epoch a phase.
    phases = (
        "[{layers: 12, train: [exit 4], loss_weights: {4: 1.0}, max_epochs: 1}, {train: [layers 5-12], "
        "loss_weights: {12: 1.0}, lr_scale: 0.2, tokens: hard, hard_exit: 4, hard_ratio: 0.5, max_epochs: 1}]"
    )
    args = cli_args("fit", "pretrained/ashem.yaml", corpus, tmp_path, "--model.pretrained", str(checkpoint))
    cli = LegoCLI(args=[*args, "--data.seq_len", "16", "--trainer.limit_train_batches", "2", "--model.phases", phases])
    module, model = cli.model, cli.model.model
    assert cli.trainer.global_step == 4 and module.phase == 2 and model.exit_layers == (4, 12)
    loaded = converted_state(checkpoint, model, saved_exit_heads=False)
    after = model.state_dict()
    kept = [k for k in after if k.startswith(("tok_emb", "pos_emb", "heads.1."))]
    kept += [k for k in after if k.startswith("blocks.") and int(k.split(".")[1]) < 4]
    above = [k for k in after if k.startswith("blocks.") and int(k.split(".")[1]) >= 4]
    assert all(torch.equal(after[k], loaded[k]) for k in kept)
    assert not torch.equal(after["heads.0.proj.weight"], loaded["heads.0.proj.weight"])  # phase 1: exit 4
    assert sum(not torch.equal(after[k], loaded[k]) for k in above) > len(above) // 2  # phase 2: layers 5-12
    # The hard set: training tokens below the threshold calibrated at exit 4, which validation routes with.
    hard = module.hard_mask
    assert hard is not None and 0.3 < hard.float().mean().item() < 0.7  # hard_ratio 0.5 of held-out tokens
    assert module.routing_threshold is not None
    assert 0 < cli.trainer.callback_metrics["val/routed/exit4_frac"].item() < 1


def test_exit_tuning_takes_the_learned_classifier_and_loss_scaled_lr(checkpoint, corpus, tmp_path):
    args = cli_args("fit", "pretrained/exit_tuning.yaml", corpus, tmp_path, "--model.pretrained", str(checkpoint))
    extra = [
        *("--data.seq_len", "16", "--data.max_train_samples", "8", "--trainer.max_epochs", "1"),
        *("--model.confidence", "learned", "--model.routing_threshold", "0.5"),
        "--trainer.callbacks+=lego_lightning.callbacks.ExitClassifierTraining",
        "--trainer.callbacks+=lego_lightning.callbacks.LossScaledLR",
    ]
    cli = LegoCLI(args=[*args, *extra])
    training = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ExitClassifierTraining")
    assert set(training.stats) == {4, 8} and all(0 <= s["accuracy"] <= 1 for s in training.stats.values())
    assert "train/lr_scale" in cli.trainer.callback_metrics
    assert {"val/routed/ppl", "val/routed/exit4_frac", "val/routed/flops_ratio"} <= set(cli.trainer.callback_metrics)
    idx = torch.randint(0, 300, (2, 8))
    module = cli.model
    routed = routed_forward(module.model, idx, 0.5, "learned", hidden_confidence=module.hidden_confidence)
    expected = torch.where(module.exit_classifier(4, module.model.hidden_states(idx, [4])[4]) >= 0.5, 0, -1)
    assert torch.equal(routed.exit_position == 0, expected == 0)  # exit 4's classifier decides who leaves there


def test_a_rule_on_the_command_line_replaces_the_configs_whole(checkpoint, corpus, tmp_path):
    args = cli_args("fit", "pretrained/exit_tuning.yaml", corpus, tmp_path, "--model.pretrained", str(checkpoint))[1:]
    every = LegoCLI(args=[*args, "--model.exits", "{every: 3, loss_weights: 1.0, final_loss_weight: 0.0}"], run=False)
    assert every.model.config.exit_layers == (3, 6, 9, 12) and every.model.exit_loss_weights == [1, 1, 1, 0]
    listed = LegoCLI(args=[*args, "--model.exits", "[6]"], run=False)  # not merged with the config's fractions
    assert listed.model.config.exit_layers == (6, 12) and listed.model.exit_loss_weights == [0.5, 0.5]
