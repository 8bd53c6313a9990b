"""``SupervisedExitLM``: train an exit transformer with a stage-weighted loss and evaluate every exit.

Every non-ASHEM strategy of the research is a config of this module (DESIGN.md, "Every
strategy is a config"): standard, deep supervision, auxiliary losses, early exit / DEED,
discriminative learning rates; dynamic alpha adds the ``ExitWeightSchedule`` callback.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from types import FrameType
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from lego_lightning.callbacks.model_summary import use_counted_flops
from lego_lightning.data.blocks import unpack_batch
from lego_lightning.data.masking import mask_tokens
from lego_lightning.model import flops
from lego_lightning.model.confidence import get_confidence
from lego_lightning.model.config import Stage, TransformerConfig, as_stage
from lego_lightning.model.exit_classifier import ExitClassifier
from lego_lightning.model.exits import ExitRule, as_exit_rule
from lego_lightning.model.layer_dropout import LayerDropout, as_layer_dropout
from lego_lightning.model.lean_loss import IGNORE_INDEX, linear_cross_entropy
from lego_lightning.model.routing import check_threshold, route
from lego_lightning.model.transformer import ExitTransformer
from lego_lightning.modules.metrics import ExitMetrics
from lego_lightning.modules.optim import Schedule, WarmupSchedule, freeze_untrainable_stages, param_groups
from lego_lightning.modules.progress import follow_description

Objective = Literal["causal", "masked"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
Trunk = Literal["train", "frozen"]
TRUNKS: tuple[str, ...] = get_args(Trunk)

# Config fields that fix the shape of the weights; a checkpoint must agree on all of them.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "n_layers",
    "d_model",
    "n_heads",
    "d_ff",
    "max_seq_len",
    "positions",
    "causal",
    "head_sharing",
    "tie_embeddings",
    "exit_layers",
    "n_kv_heads",
    "head_dim",
    "norm",
    "activation",
    "qkv_bias",
    "bias",
)


# The model's sizes a module takes as keyword arguments: every field of TransformerConfig but
# those the module derives itself (the vocabulary from the data and the objective, attention's
# direction from the objective, the stages from its own argument).
SIZE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(TransformerConfig) if f.name not in ("vocab_size", "causal", "stages")
)


def check_size_fields(sizes: Mapping[str, Any], owner: str) -> None:
    """Refuse a keyword argument that is not one of the model's sizes, naming those that are."""
    unknown = sorted(set(sizes) - set(SIZE_FIELDS))
    if unknown:
        raise TypeError(f"{owner} got unexpected arguments {unknown}: the model's sizes are {list(SIZE_FIELDS)}")


def pretrained_sizes(pretrained: str, data_vocab: int, sizes: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """The vocabulary and sizes of a pretrained checkpoint; ``sizes`` may choose dropout, head sharing
    and a shorter context, and any other size given must be the checkpoint's (or left at its default)."""
    from lego_lightning.model.pretrained import config_from_hf, read_config

    _, hf, _ = read_config(pretrained)
    base = config_from_hf(hf)
    if data_vocab > base.vocab_size:
        raise ValueError(
            f"the data's vocab_size={data_vocab} is larger than the pretrained model's {base.vocab_size}: "
            f"tokenize with its tokenizer (data.tokenizer: {pretrained})"
        )
    defaults = {f.name: f.default for f in fields(TransformerConfig)}
    chosen: dict[str, Any] = {}
    for name in SIZE_FIELDS:
        theirs, given = getattr(base, name), sizes.get(name, defaults[name])
        if name in ("dropout", "head_sharing"):
            chosen[name] = given
        elif name == "max_seq_len" and given != defaults[name]:
            if given > theirs:
                raise ValueError(f"model.max_seq_len={given} is longer than the pretrained model's context {theirs}")
            chosen[name] = given
        elif given not in (defaults[name], theirs):
            raise ValueError(
                f"model.{name}={given!r} but the pretrained model has {name}={theirs!r}: its sizes come from "
                f"{pretrained}; leave {name} out"
            )
        else:
            chosen[name] = theirs
    return base.vocab_size, chosen


def pretrained_depth(pretrained: str) -> int:
    """The number of layers of a pretrained checkpoint (read from its ``config.json``)."""
    from lego_lightning.model.pretrained import config_from_hf, read_config

    return config_from_hf(read_config(pretrained)[1]).n_layers


def stages_or_rule(
    stages: Sequence[Stage | Mapping[str, Any]] | None,
    exits: ExitRule | Mapping[str, Any] | str | Sequence[int] | None,
    n_layers: int,
) -> Sequence[Stage | Mapping[str, Any]] | None:
    """The stages given, or the exit rule resolved for ``n_layers`` layers; both given is an error."""
    if exits is None:
        return stages
    if stages:
        raise ValueError(
            "model.stages and model.exits were both given: they are two ways to place the exits, give one "
            "(exits is a rule that fits any depth; stages names every layer)"
        )
    return as_exit_rule(exits).stages(n_layers)


def freeze_trunk(model: ExitTransformer) -> None:
    """Freeze the embeddings, every layer and the final exit's head; an error when nothing would train."""
    final = model.head(model.config.n_layers)
    for param in [*model.tok_emb.parameters(), *model.blocks.parameters(), *final.parameters()]:
        param.requires_grad_(False)
    if model.pos_emb is not None:
        model.pos_emb.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"trunk='frozen' with head_sharing={model.config.head_sharing!r} and exits {model.config.exit_layers} "
            "leaves nothing to train: the exits need their own heads (head_sharing: separate) and an exit "
            "before the last layer"
        )


def masked_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over targets that are not ``IGNORE_INDEX``; 0 (with a graph) when there are none.

    ``F.cross_entropy`` returns NaN for a batch whose targets are all ignored, which happens
    when a batch holds no hard token.
    """
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class SupervisedExitLM(L.LightningModule):
    """A language model with an exit after each stage, trained with per-exit loss weights.

    Args:
        vocab_size: the data's vocabulary, linked from the data module by the ``lego`` CLI.
        stages: the LEGO blocks; default one stage over all layers.
        exits: instead of ``stages``, a rule for the exits resolved against the model's depth
            when it is built (:class:`~lego_lightning.model.exits.ExitRule`): ``all`` (every
            layer), a list of layer numbers, ``{every: N}`` or ``{fractions: [...]}``, with each
            exit's loss weight (a number or a scale over depth such as ``uniform`` or
            ``sqrt_l``) and lr scale, so one config fits any depth (``--model.pretrained``
            included). ``stages`` and ``exits`` are alternatives: give one.
        layer_dropout: LayerSkip's layer dropout in training
            (:class:`~lego_lightning.model.layer_dropout.LayerDropout`: ``p_max``, ``scale``,
            ``ramp_steps``): each sample skips layer ``l`` at a rate rising with depth. ``None``
            drops nothing.
        routing_threshold: when set, validation also reports the routed model, where a token
            leaves at the first exit whose confidence reaches the threshold, and ``val/ppl`` is
            the routed perplexity. Tokens below the threshold at the first exit are "hard":
            every exit's perplexity is also reported on hard and easy tokens.
        confidence: a registered confidence measure (``max_prob``, ``margin``, ``entropy``), or
            ``learned``: an :class:`~lego_lightning.model.exit_classifier.ExitClassifier` on each
            non-final exit's hidden state, trained with the model frozen by the
            :class:`~lego_lightning.callbacks.ExitClassifierTraining` callback.
        lr, weight_decay, betas: AdamW; norms, biases and embeddings get no weight decay.
        scheduler, warmup_steps, min_lr_ratio: the learning-rate schedule, stepped every
            optimizer step; per-stage ``lr_scale`` multiplies it.
        objective: ``causal`` (next token) or ``masked`` (masked words, BERT-style): attention
            sees both directions, ``mask_prob`` of the tokens are chosen (80% become a
            ``<mask>`` input, 10% a random token, 10% stay) and loss and metrics cover the
            chosen tokens only. The ``<mask>`` input gets id ``vocab_size``, one past the data's
            vocabulary. Validation masks the same positions every epoch. Exits and routing
            work as in the causal case.
        loss_chunk_size: training computes each exit's cross-entropy over chunks of this many
            tokens, so no exit ever holds a full ``tokens x vocab`` logit tensor (deep
            supervision's memory stays near standard training's); ``None`` uses the plain loss.
        pretrained: a Hugging Face checkpoint of GPT-2 or the Llama family (a folder with
            ``config.json`` and ``*.safetensors``, or a hub name), converted by
            :mod:`lego_lightning.model.pretrained`: the sizes and the vocabulary come from it
            (``dropout``, ``head_sharing`` and a shorter ``max_seq_len`` may be chosen), every
            exit starts as its final norm and LM head, and the weights load when a trainer sets
            the module up (a checkpoint given to the trainer then replaces them, as on resume).
            The ``lego`` CLI tokenizes with the checkpoint's tokenizer unless ``data.tokenizer``
            names one.
        trunk: ``train``, or ``frozen``: the embeddings, every layer and the final exit's head
            keep their weights, so the final exit's outputs never change, and only the other
            exits' own heads (``head_sharing: separate``) train (EE-Tuning).
        **sizes: the model's sizes, declared once as the fields of
            :class:`~lego_lightning.model.TransformerConfig` (``n_layers``, ``d_model``,
            ``n_heads``, ``d_ff``, ``max_seq_len``, ``dropout``, ``positions``, ``head_sharing``,
            ``tie_embeddings``, ``tie_exit_heads``, and the pretrained families' forms
            ``n_kv_heads``, ``norm``, ``norm_eps``, ``activation``, ``qkv_bias``, ``bias``,
            ``rope_base``, ``rope_scaling``, ``head_dim``); on the command line
            ``--model.d_model 64`` as before.

    Logged: ``train/loss``, ``train/exit{k}/loss``, ``val/exit{k}/{loss,ppl,acc}``,
    ``val/exit{k}/agree`` (how often exit ``k``'s greedy token is the deepest exit's: the acceptance
    rate of self-speculative decoding that drafts there),
    ``val/ppl``, ``val/loss`` (the exits' losses at their training weights, summed as
    ``train/loss``: what to monitor when the deepest exit cannot change, as in EE-Tuning),
    ``val/exit{k}/bpb`` (and ``val/routed/bpb``) when the data gives the bytes of
    text its targets cover (``TextDataModule`` does; causal objective only), and with routing
    ``val/routed/{ppl,acc,exit{k}_frac,flops_ratio,layers_ratio}`` and
    ``val/exit{k}/{hard,easy}_ppl``; with layer dropout ``train/layer_dropout/{layer}`` (the rate
    in force). Under DDP, ``val/*`` are reduced over every rank's
    tokens (equal on all ranks); ``train/*`` are the logging rank's own batch, as usual in
    Lightning, to keep steps free of extra syncs.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        stages: Sequence[Stage] | None = None,
        exits: dict[str, Any] | str | list[int] | ExitRule | None = None,
        layer_dropout: LayerDropout | None = None,
        routing_threshold: float | None = None,
        confidence: str = "max_prob",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: Schedule = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        objective: Objective = "causal",
        mask_prob: float = 0.15,
        loss_chunk_size: int | None = 1024,
        pretrained: str | None = None,
        trunk: Trunk = "train",
        **sizes: Any,
    ) -> None:
        super().__init__()
        check_size_fields(sizes, type(self).__name__)
        if trunk not in TRUNKS:
            raise ValueError(f"trunk={trunk!r} is not one of {TRUNKS}")
        if trunk == "frozen" and pretrained is None:
            raise ValueError("trunk='frozen' keeps a trained trunk as it is: it needs model.pretrained (a checkpoint)")
        if loss_chunk_size is not None and (not isinstance(loss_chunk_size, int) or loss_chunk_size < 1):
            raise ValueError(f"loss_chunk_size must be a positive integer or None, got {loss_chunk_size!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        check_threshold(routing_threshold, "routing_threshold")
        get_confidence(confidence)  # raises for an unknown name
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        WarmupSchedule(scheduler, warmup_steps, None if scheduler == "constant" else warmup_steps + 1, min_lr_ratio)
        self._save_plain_hyperparameters(inspect.currentframe())
        self.objective, self.mask_prob, self.data_vocab_size = objective, mask_prob, vocab_size
        self.loss_chunk_size = loss_chunk_size
        model_vocab = vocab_size + (1 if objective == "masked" else 0)  # the <mask> input id
        if pretrained is not None:
            if objective != "causal":
                raise ValueError(f"pretrained={pretrained!r} is a causal model: objective must be 'causal'")
            model_vocab, sizes = pretrained_sizes(pretrained, vocab_size, sizes)
        placed = stages_or_rule(stages, exits, sizes.get("n_layers", TransformerConfig.n_layers))
        self.layer_dropout = as_layer_dropout(layer_dropout)
        self.config = TransformerConfig(
            vocab_size=model_vocab,
            causal=objective == "causal",
            stages=tuple(as_stage(s) for s in placed or ()),
            **sizes,
        )
        self.model = ExitTransformer(self.config)
        freeze_untrainable_stages(self.model)
        if trunk == "frozen":
            freeze_trunk(self.model)
        self._pretrained_to_load = pretrained
        self.confidence = confidence
        # Trained apart from the model (its own optimizer, the model frozen), so DDP and the
        # main optimizer never see it as trainable.
        self.exit_classifier = (
            ExitClassifier(self.config.d_model, self.config.exit_layers[:-1]).requires_grad_(False)
            if confidence == "learned"
            else None
        )
        self._routing_threshold = routing_threshold
        self.optim_settings = dict(
            lr=lr,
            weight_decay=weight_decay,
            betas=tuple(betas),
            scheduler=scheduler,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
        )
        self.exit_loss_weights: list[float] = [s.loss_weight for s in self.config.stages]
        self.val_metrics = ExitMetrics(self.config.exit_layers)
        self.test_metrics = ExitMetrics(self.config.exit_layers)
        self._eval_seq_len: int | None = None

    def _save_plain_hyperparameters(self, frame: FrameType | None) -> None:
        """``save_hyperparameters`` with stages as plain dicts (``weights_only`` checkpoints, YAML).

        Each subclass calls it again at the end of its ``__init__`` so the hyperparameters are
        the arguments of the class that was built, which is what rebuilds it from a checkpoint
        (``save_hyperparameters`` merges into what is there, hence the clear).
        """
        self.hparams.clear()
        self.save_hyperparameters(frame=frame)
        if self.hparams.get("stages"):
            self.hparams["stages"] = [as_stage(s).to_dict() for s in self.hparams["stages"]]
        if self.hparams.get("exits") is not None:
            self.hparams["exits"] = as_exit_rule(self.hparams["exits"]).to_dict()
        if self.hparams.get("layer_dropout") is not None:
            self.hparams["layer_dropout"] = as_layer_dropout(self.hparams["layer_dropout"]).to_dict()

    @property
    def routing_threshold(self) -> float | None:
        """Confidence threshold of routed evaluation; ``None`` turns routing off. Settable, e.g. for a sweep."""
        return self._routing_threshold

    @routing_threshold.setter
    def routing_threshold(self, value: float | None) -> None:
        check_threshold(value, "routing_threshold")
        self._routing_threshold = None if value is None else float(value)

    # ------------------------------------------------------------------------- loss weights
    @property
    def num_exits(self) -> int:
        return len(self.config.stages)

    def set_exit_loss_weights(self, weights: Sequence[float]) -> None:
        """Replace the per-exit loss weights (shallowest first); used by ``ExitWeightSchedule``."""
        weights = [float(w) for w in weights]
        if len(weights) != self.num_exits:
            raise ValueError(
                f"got {len(weights)} exit loss weights for {self.num_exits} exits {self.config.exit_layers}"
            )
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"exit loss weights must be >= 0 and not all 0, got {weights}")
        self.exit_loss_weights = weights

    # ------------------------------------------------------------------------------- forward
    def exit_hidden_states(
        self, input_ids: Tensor, exit_layers: Sequence[int], keep: Tensor | None = None
    ) -> dict[int, Tensor]:
        """Hidden states ``(B, T, D)`` at the given exits; the one place training and evaluation read them.

        ``keep`` is layer dropout's mask (training only; :meth:`layer_keep`)."""
        return self.model.hidden_states(input_ids, exit_layers, keep)

    @property
    def eval_exit_layers(self) -> tuple[int, ...]:
        """The exits validation reports (all of them here; a phased module reports the trained ones)."""
        return self.config.exit_layers

    def exit_confidence(self, exit_layer: int, hidden: Tensor, logits: Tensor | None = None) -> Tensor:
        """Confidence of tokens at an exit: from ``logits`` (computed here if not given), or from
        ``hidden`` alone with ``confidence="learned"``; the deepest exit decides nothing (ones)."""
        if exit_layer == self.config.exit_layers[-1] and self.exit_classifier is not None:
            return torch.ones(hidden.shape[:-1], device=hidden.device)
        if self.exit_classifier is not None:
            return self.exit_classifier(exit_layer, hidden)
        return get_confidence(self.confidence)(self.model.head(exit_layer)(hidden) if logits is None else logits)

    @property
    def hidden_confidence(self) -> ExitClassifier | None:
        """The learned classifier, for :func:`~lego_lightning.model.early_exit.routed_forward` and ``generate``."""
        return self.exit_classifier

    @torch.no_grad()
    def token_confidence(self, input_ids: Tensor, exit_layer: int | None = None) -> Tensor:
        """Confidence ``(B, T)`` of every token at ``exit_layer`` (default: the first exit).

        The contract that ``QuantileThresholdCalibration`` and ``HardExampleMining`` rely on.
        """
        exit_layer = self.config.exit_layers[0] if exit_layer is None else exit_layer
        h = self.exit_hidden_states(input_ids, [exit_layer])[exit_layer]
        return self.exit_confidence(exit_layer, h)

    def model_inputs(self, batch: Any, batch_idx: int | None = None) -> tuple[Tensor, Tensor]:
        """``(input_ids, targets)`` for the objective; ``batch_idx`` fixes the masking (evaluation)."""
        input_ids, targets = unpack_batch(batch)
        if self.objective == "causal":
            return input_ids, targets
        generator = None if batch_idx is None else torch.Generator().manual_seed(batch_idx)
        return mask_tokens(input_ids, self.data_vocab_size, self.data_vocab_size, self.mask_prob, generator)

    # -------------------------------------------------------------------------------- training
    def exit_loss(self, exit_layer: int, hidden: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of one exit over ``(..., D)`` hidden states and matching targets."""
        head = self.model.head(exit_layer)
        if self.loss_chunk_size is None:
            return masked_cross_entropy(head(hidden).flatten(0, -2), targets.flatten())
        normed = head.norm(hidden).flatten(0, -2)
        return linear_cross_entropy(normed, head.proj.weight, targets.flatten(), self.loss_chunk_size)

    def exit_losses(self, input_ids: Tensor, targets: Tensor, keep: Tensor | None = None) -> dict[int, Tensor]:
        """Mean cross-entropy at every exit with a non-zero weight; other exits run no head.

        ``keep``: layer dropout's mask, ``(B, n_layers)`` bool (:meth:`layer_keep`)."""
        weighted = [k for k, w in zip(self.config.exit_layers, self.exit_loss_weights) if w > 0]
        hidden = self.exit_hidden_states(input_ids, weighted, keep)
        return {k: self.exit_loss(k, h, targets) for k, h in hidden.items()}

    def layer_keep(self, batch_size: int, batch_idx: int) -> Tensor | None:
        """Layer dropout's mask for this training batch (``None`` without layer dropout), and its rates logged.

        The draw depends on the rank, the optimizer step and the batch's place in gradient
        accumulation (:mod:`~lego_lightning.model.layer_dropout`): a resumed run draws what the
        uninterrupted one drew, and ranks draw independently.
        """
        if self.layer_dropout is None:
            return None
        step = self.global_step
        rates = self.layer_dropout.rates(self.config.n_layers, step)
        for layer, rate in enumerate(rates, start=1):
            self.log(f"train/layer_dropout/{layer}", rate)
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        key = (self.global_rank, step, batch_idx % accumulate)
        return self.layer_dropout.keep_mask(batch_size, rates, key, self.device)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        input_ids, targets = self.model_inputs(batch)
        keep = self.layer_keep(input_ids.shape[0], batch_idx)
        # Without layer dropout, the two-argument call that subclasses written before it override.
        losses = self.exit_losses(input_ids, targets) if keep is None else self.exit_losses(input_ids, targets, keep)
        weights = dict(zip(self.config.exit_layers, self.exit_loss_weights))
        loss = sum(weights[k] * v for k, v in losses.items())
        self.log("train/loss", loss, prog_bar=True)
        for k, v in losses.items():
            self.log(f"train/exit{k}/loss", v)
        return loss  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: Any, batch_idx: int, metrics: ExitMetrics) -> None:
        input_ids, targets = self.model_inputs(batch, batch_idx)
        self._eval_seq_len = input_ids.shape[1]
        targets = targets.flatten()
        keep = targets != IGNORE_INDEX
        targets = targets[keep]
        threshold = self.routing_threshold
        nlls, corrects, tops, confidences = [], [], [], []
        exits = self.eval_exit_layers
        for k, h in self.exit_hidden_states(input_ids, exits).items():
            h = h.flatten(0, 1)[keep]
            logits = self.model.head(k)(h).float()
            nlls.append(F.cross_entropy(logits, targets, reduction="none"))
            tops.append(logits.argmax(dim=-1))
            corrects.append(tops[-1] == targets)
            if threshold is not None:
                confidences.append(self.exit_confidence(k, h, logits))
        hard = confidences[0] < threshold if threshold is not None else None
        if isinstance(batch, Mapping) and "target_bytes" in batch and self.objective == "causal":
            metrics.update_bytes(targets.numel(), batch["target_bytes"])
        for k, nll, correct, top in zip(exits, nlls, corrects, tops):
            # Greedy self-speculative decoding drafting at exit k keeps a token exactly when the deepest exit agrees.
            metrics.update_exit(k, nll, correct, hard, agree=top == tops[-1])
        if threshold is not None:
            position = route(torch.stack(confidences), threshold)
            pick = position.unsqueeze(0)
            routed_nll = torch.stack(nlls).gather(0, pick).squeeze(0)
            routed_correct = torch.stack(corrects).gather(0, pick).squeeze(0)
            metrics.update_routed(routed_nll, routed_correct, position, exits)

    def _log_eval(self, metrics: ExitMetrics, prefix: str) -> dict[str, float]:
        values = metrics.compute()
        metrics.reset()
        if not values:
            return values
        ppl = values.get("routed/ppl", values.get(f"exit{self.eval_exit_layers[-1]}/ppl", float("nan")))
        # What training minimises, on every validation token: the exits' losses at their training weights.
        weighted = {k: w for k, w in zip(self.config.exit_layers, self.exit_loss_weights) if w > 0}
        if all(f"exit{k}/loss" in values for k in weighted):
            values["loss"] = sum(w * values[f"exit{k}/loss"] for k, w in weighted.items())
        if "routed/ppl" in values and self._eval_seq_len is not None:
            fractions = {k: values.get(f"routed/exit{k}_frac", 0.0) for k in self.config.exit_layers}
            context = flops.mean_context(self._eval_seq_len, self.config.causal)
            values["routed/flops_ratio"] = flops.routed_flops_ratio(self.config, fractions, context, self.confidence)
            values["routed/layers_ratio"] = flops.layers_only_ratio(self.config, fractions)
        # torchmetrics already reduced these over all ranks; sync_dist only averages equal values
        # (a few scalars per epoch) and keeps Lightning from warning about every one of them.
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, sync_dist=True)
        self.log(f"{prefix}/ppl", ppl, prog_bar=True, sync_dist=True)
        return values

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_eval(self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_eval(self.test_metrics, "test")

    # ------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if self._pretrained_to_load is not None:  # before a trainer's checkpoint, which replaces them
            from lego_lightning.model.pretrained import converted_state, resolve

            self.model.load_state_dict(converted_state(resolve(self._pretrained_to_load), self.model, True))
            self._pretrained_to_load = None
        datamodule = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise ValueError(
                f"data.seq_len={seq_len} is larger than the model's context model.max_seq_len={self.config.max_seq_len}"
            )
        data_vocab = getattr(datamodule, "vocab_size", None)
        if data_vocab is not None and data_vocab != self.data_vocab_size:
            raise ValueError(
                f"model.vocab_size={self.data_vocab_size} but the data has vocab_size={data_vocab}; "
                "the lego CLI links them, set them equal when building the module yourself"
            )
        if stage == "fit":
            self._check_something_trains()
            self._check_ddp_unused_parameters()
            use_counted_flops(self.trainer)  # the model summary's FLOPs column: ours per token, not zeros

    def _check_something_trains(self) -> None:
        """Trainer settings under which fit would end at once and report an untrained model as a result."""
        trainer = self.trainer
        for name, value in (("max_epochs", trainer.max_epochs), ("max_steps", trainer.max_steps)):
            if value == 0:
                raise ValueError(
                    f"trainer.{name}=0 trains nothing: allowed a positive number, or -1 for no limit (phased modules "
                    "end each phase themselves)"
                )
        if trainer.limit_train_batches == 0:
            # Written as 0 whether it came as 0 or 0.0: which of the two the CLI passes depends on what is installed.
            raise ValueError(
                "trainer.limit_train_batches=0 trains nothing: allowed a positive number of batches or a fraction "
                "in (0, 1]"
            )

    def _untrained_stages(self) -> list[tuple[int, int]]:
        """Trainable stages whose weights get no gradient at the current loss weights.

        A stage whose every weight is frozen (``trunk: frozen``) asks for no gradient and is not one."""
        weights = self.exit_loss_weights
        deepest_trained = max(k for k, w in zip(self.config.exit_layers, weights) if w > 0)
        separate = self.config.head_sharing == "separate"
        wanting = {stage for stage, _, p in self.model.named_stage_parameters() if p.requires_grad}
        return [
            s.layers
            for i, (s, w) in enumerate(zip(self.config.stages, weights))
            if s.trainable and i in wanting and (s.layers[0] > deepest_trained or (w == 0 and separate))
        ]

    def _check_ddp_unused_parameters(self) -> None:
        """DDP without ``find_unused_parameters`` fails on trainable weights that get no gradient."""
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", {})
        if not isinstance(strategy, DDPStrategy) or ddp_kwargs.get("find_unused_parameters", False):
            return
        unused = self._untrained_stages()
        if unused:
            raise ValueError(
                f"stages {unused} have trainable weights that get no gradient (loss weight 0 with a "
                "separate head, or layers above the deepest trained exit); under DDP use "
                "strategy='ddp_find_unused_parameters_true' or set trainable: false on those stages"
            )

    def configure_callbacks(self) -> list[Callback]:
        """Every rank's random-number states go into checkpoints, so a resumed run is exact also with dropout."""
        from lego_lightning.callbacks.random_state import RandomStateCheckpoint

        return [RandomStateCheckpoint()]

    # ----------------------------------------------------------------------------- progress bar
    def train_description(self) -> str | None:
        """The training bar's description; ``None`` keeps Lightning's (which reads ``Epoch N/-2`` without an
        epoch limit: then ``Epoch N``)."""
        return f"Epoch {self.current_epoch}" if self.trainer.max_epochs in (None, -1) else None

    def on_fit_start(self) -> None:
        follow_description(self.trainer, self.train_description)

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """AdamW's parameter groups: one per stage and weight-decay setting (:func:`.optim.param_groups`)."""
        return param_groups(self.model, self.optim_settings["lr"], self.optim_settings["weight_decay"])

    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.optim_settings
        optimizer = AdamW(self.optimizer_param_groups(), lr=opt["lr"], betas=opt["betas"])
        total = None if opt["scheduler"] == "constant" else self.trainer.estimated_stepping_batches
        schedule = WarmupSchedule(opt["scheduler"], opt["warmup_steps"], total, opt["min_lr_ratio"])
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }

    # -------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["exit_loss_weights"] = list(self.exit_loss_weights)
        checkpoint["routing_threshold"] = self.routing_threshold
        config = asdict(self.config)
        config["stages"] = [s.to_dict() for s in self.config.stages]
        config["exit_layers"] = list(self.config.exit_layers)
        checkpoint["model_config"] = config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_checkpoint_fits(checkpoint)
        if "exit_loss_weights" in checkpoint:
            self.exit_loss_weights = [float(w) for w in checkpoint["exit_loss_weights"]]

    def _check_checkpoint_fits(self, checkpoint: Mapping[str, Any]) -> None:
        """A clear error, before any weight is copied, when the checkpoint's model differs from this one."""
        saved = checkpoint.get("model_config")
        if saved:
            ours = {**asdict(self.config), "exit_layers": list(self.config.exit_layers)}
            for field in ARCHITECTURE_FIELDS:
                if field in saved and saved[field] != ours[field]:
                    hint = (
                        " (vocab_size comes from the data: use the data the checkpoint was trained on)"
                        if field == "vocab_size"
                        else ": build the model with the settings it was trained with (the config.yaml saved beside "
                        "its logs), or leave out the setting that differs"
                    )
                    raise ValueError(
                        f"the checkpoint has {field}={saved[field]} but this model has {field}={ours[field]}{hint}"
                    )
        own = self.state_dict()
        for name, tensor in checkpoint.get("state_dict", {}).items():
            if name in own and own[name].shape != tensor.shape:
                ours = tuple(own[name].shape)
                raise ValueError(f"the checkpoint's {name} has shape {tuple(tensor.shape)} but this model's has {ours}")
