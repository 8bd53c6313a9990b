"""``SupervisedExitLM``: train an exit transformer with a stage-weighted loss and evaluate every exit.

Every non-ASHEM strategy of the research is a config of this module (DESIGN.md, "Every
strategy is a config"): standard, deep supervision, auxiliary losses, early exit / DEED,
discriminative learning rates; dynamic alpha adds the ``ExitWeightSchedule`` callback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from lego_lightning.data.blocks import unpack_batch
from lego_lightning.model import flops
from lego_lightning.model.confidence import get_confidence
from lego_lightning.model.config import Stage, TransformerConfig, as_stage
from lego_lightning.model.routing import check_threshold, route
from lego_lightning.model.transformer import ExitTransformer
from lego_lightning.modules.metrics import ExitMetrics
from lego_lightning.modules.optim import Schedule, WarmupSchedule, freeze_untrainable_stages, param_groups

IGNORE_INDEX = -100  # targets with this value count in no loss and no metric

# Hyperparameters that fix the shape of the weights; a checkpoint must agree on all of them.
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
)


def config_from_hparams(hp: Mapping[str, Any]) -> TransformerConfig:
    """The model config described by a module's hyperparameters (its own, or a checkpoint's)."""
    return TransformerConfig(
        vocab_size=hp["vocab_size"],
        n_layers=hp["n_layers"],
        d_model=hp["d_model"],
        n_heads=hp["n_heads"],
        d_ff=hp["d_ff"],
        max_seq_len=hp["max_seq_len"],
        dropout=hp["dropout"],
        positions=hp["positions"],
        head_sharing=hp["head_sharing"],
        tie_embeddings=hp["tie_embeddings"],
        stages=tuple(as_stage(s) for s in hp.get("stages") or ()),
    )


class SupervisedExitLM(L.LightningModule):
    """A language model with an exit after each stage, trained with per-exit loss weights.

    Args:
        vocab_size: linked from the data module by the ``lego`` CLI.
        n_layers, d_model, n_heads, d_ff, max_seq_len, dropout, positions, head_sharing,
            tie_embeddings: the :class:`~lego_lightning.model.TransformerConfig`.
        stages: the LEGO blocks; default one stage over all layers.
        routing_threshold: when set, validation also reports the routed model, where a token
            leaves at the first exit whose confidence reaches the threshold, and ``val/ppl`` is
            the routed perplexity.
        confidence: a registered confidence measure (``max_prob``, ``margin``, ``entropy``).
        lr, weight_decay, betas: AdamW; norms, biases and embeddings get no weight decay.
        scheduler, warmup_steps, min_lr_ratio: the learning-rate schedule, stepped every
            optimizer step; per-stage ``lr_scale`` multiplies it.

    Logged: ``train/loss``, ``train/exit{k}/loss``, ``val/exit{k}/{loss,ppl,acc}``,
    ``val/ppl``, and with routing ``val/routed/{ppl,acc,exit{k}_frac,flops_ratio,layers_ratio}``.
    Under DDP, ``val/*`` are reduced over every rank's tokens (equal on all ranks); ``train/*``
    are the logging rank's own batch, as usual in Lightning, to keep steps free of extra syncs.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        n_layers: int = 3,
        d_model: int = 64,
        n_heads: int = 4,
        d_ff: int | None = None,
        max_seq_len: int = 256,
        dropout: float = 0.0,
        positions: str = "learned",
        head_sharing: str = "shared",
        tie_embeddings: bool = False,
        stages: Sequence[Stage] | None = None,
        routing_threshold: float | None = None,
        confidence: str = "max_prob",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: Schedule = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        check_threshold(routing_threshold, "routing_threshold")
        get_confidence(confidence)  # raises for an unknown name
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        WarmupSchedule(scheduler, warmup_steps, None if scheduler == "constant" else warmup_steps + 1, min_lr_ratio)
        self.save_hyperparameters()
        # Plain dicts in hparams: checkpoints must load with weights_only=True and YAML must round-trip.
        self.hparams["stages"] = [as_stage(s).to_dict() for s in stages] if stages else None
        self.config = config_from_hparams(self.hparams)
        self.model = ExitTransformer(self.config)
        freeze_untrainable_stages(self.model)
        self.exit_loss_weights: list[float] = [s.loss_weight for s in self.config.stages]
        self.val_metrics = ExitMetrics(self.config.exit_layers)
        self.test_metrics = ExitMetrics(self.config.exit_layers)
        self._eval_seq_len: int | None = None

    @property
    def routing_threshold(self) -> float | None:
        """Confidence threshold of routed evaluation; ``None`` turns routing off. Settable, e.g. for a sweep."""
        return self.hparams.routing_threshold

    @routing_threshold.setter
    def routing_threshold(self, value: float | None) -> None:
        check_threshold(value, "routing_threshold")
        self.hparams["routing_threshold"] = value

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

    # -------------------------------------------------------------------------------- training
    def exit_losses(self, input_ids: Tensor, targets: Tensor) -> dict[int, Tensor]:
        """Mean cross-entropy at every exit with a non-zero weight; other exits run no head."""
        weighted = [k for k, w in zip(self.config.exit_layers, self.exit_loss_weights) if w > 0]
        hidden = self.model.hidden_states(input_ids, weighted)
        return {
            k: F.cross_entropy(
                self.model.head(k)(h).flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
            )
            for k, h in hidden.items()
        }

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        input_ids, targets = unpack_batch(batch)
        losses = self.exit_losses(input_ids, targets)
        weights = dict(zip(self.config.exit_layers, self.exit_loss_weights))
        loss = sum(weights[k] * v for k, v in losses.items())
        self.log("train/loss", loss, prog_bar=True)
        for k, v in losses.items():
            self.log(f"train/exit{k}/loss", v)
        return loss  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: Any, metrics: ExitMetrics) -> None:
        input_ids, targets = unpack_batch(batch)
        self._eval_seq_len = input_ids.shape[1]
        targets = targets.flatten()
        keep = targets != IGNORE_INDEX
        targets = targets[keep]
        threshold = self.routing_threshold
        measure = get_confidence(self.hparams.confidence)
        nlls, corrects, confidences = [], [], []
        for k, h in self.model.hidden_states(input_ids).items():
            logits = self.model.head(k)(h).flatten(0, 1)[keep].float()
            nll = F.cross_entropy(logits, targets, reduction="none")
            correct = logits.argmax(dim=-1) == targets
            metrics.update_exit(k, nll, correct)
            if threshold is not None:
                nlls.append(nll)
                corrects.append(correct)
                confidences.append(measure(logits))
        if threshold is not None:
            position = route(torch.stack(confidences), threshold)
            pick = position.unsqueeze(0)
            metrics.update_routed(
                torch.stack(nlls).gather(0, pick).squeeze(0),
                torch.stack(corrects).gather(0, pick).squeeze(0),
                position,
            )

    def _log_eval(self, metrics: ExitMetrics, prefix: str) -> None:
        values = metrics.compute()
        metrics.reset()
        if not values:
            return
        deepest = self.config.exit_layers[-1]
        ppl = values.get("routed/ppl", values.get(f"exit{deepest}/ppl", float("nan")))
        if "routed/ppl" in values and self._eval_seq_len is not None:
            fractions = {k: values[f"routed/exit{k}_frac"] for k in self.config.exit_layers}
            context = flops.mean_context(self._eval_seq_len, self.config.causal)
            values["routed/flops_ratio"] = flops.routed_flops_ratio(
                self.config, fractions, context, self.hparams.confidence
            )
            values["routed/layers_ratio"] = flops.layers_only_ratio(self.config, fractions)
        # torchmetrics already reduced these over all ranks; sync_dist only averages equal values
        # (a few scalars per epoch) and keeps Lightning from warning about every one of them.
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, sync_dist=True)
        self.log(f"{prefix}/ppl", ppl, prog_bar=True, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_eval(self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_eval(self.test_metrics, "test")

    # ------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise ValueError(
                f"data.seq_len={seq_len} is larger than the model's context model.max_seq_len={self.config.max_seq_len}"
            )
        data_vocab = getattr(datamodule, "vocab_size", None)
        if data_vocab is not None and data_vocab != self.config.vocab_size:
            raise ValueError(
                f"model.vocab_size={self.config.vocab_size} but the data has vocab_size={data_vocab}; "
                "the lego CLI links them, set them equal when building the module yourself"
            )
        if stage == "fit":
            self._check_ddp_unused_parameters()

    def _check_ddp_unused_parameters(self) -> None:
        """DDP without ``find_unused_parameters`` hangs or fails on trainable weights that get no gradient."""
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", {})
        if not isinstance(strategy, DDPStrategy) or ddp_kwargs.get("find_unused_parameters", False):
            return
        deepest_trained = max(k for k, w in zip(self.config.exit_layers, self.exit_loss_weights) if w > 0)
        unused_stages = [
            s.layers
            for s, w in zip(self.config.stages, self.exit_loss_weights)
            if s.trainable and (s.layers[0] > deepest_trained or (w == 0 and self.config.head_sharing == "separate"))
        ]
        if unused_stages:
            raise ValueError(
                f"stages {unused_stages} have trainable weights that get no gradient (loss weight 0 with a "
                "separate head, or layers above the deepest trained exit); under DDP use "
                "strategy='ddp_find_unused_parameters_true' or set trainable: false on those stages"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = AdamW(param_groups(self.model, hp.lr, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas))
        total = None if hp.scheduler == "constant" else self.trainer.estimated_stepping_batches
        schedule = WarmupSchedule(hp.scheduler, hp.warmup_steps, total, hp.min_lr_ratio)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }

    # -------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["exit_loss_weights"] = list(self.exit_loss_weights)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_checkpoint_fits(checkpoint)
        if "exit_loss_weights" in checkpoint:
            self.exit_loss_weights = [float(w) for w in checkpoint["exit_loss_weights"]]

    def _check_checkpoint_fits(self, checkpoint: Mapping[str, Any]) -> None:
        """A clear error, before any weight is copied, when the checkpoint's model differs from this one."""
        saved = checkpoint.get("hyper_parameters")
        if saved:
            saved_cfg = config_from_hparams({**dict(self.hparams), **saved})
            for field in ARCHITECTURE_FIELDS:
                theirs, ours = getattr(saved_cfg, field), getattr(self.config, field)
                if theirs != ours:
                    hint = (
                        " (vocab_size comes from the data: use the data the checkpoint was trained on)"
                        if field == "vocab_size"
                        else ""
                    )
                    raise ValueError(f"the checkpoint has {field}={theirs} but this model has {field}={ours}{hint}")
        own = self.state_dict()
        theirs_sd = checkpoint.get("state_dict", {})
        for name, tensor in theirs_sd.items():
            if name in own and own[name].shape != tensor.shape:
                ours = tuple(own[name].shape)
                raise ValueError(f"the checkpoint's {name} has shape {tuple(tensor.shape)} but this model's has {ours}")
