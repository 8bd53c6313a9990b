"""Every rank's random-number states in checkpoints, so a resumed run draws what the uninterrupted run drew."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

CHECKPOINT_KEY = "random_states"


def collect_random_states() -> dict[str, Any]:
    """This process's torch (CPU and every CUDA device), Python and NumPy generator states, as plain values.

    Plain values (tensors, ints, lists, strings) so a checkpoint holding them loads with
    ``torch.load(..., weights_only=True)``.
    """
    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(python_state), gauss],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def restore_random_states(state: dict[str, Any]) -> None:
    """Set this process's generators to a state from :func:`collect_random_states`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )


def gather_random_states(trainer: L.Trainer) -> list[dict[str, Any]]:
    """Every rank's :func:`collect_random_states`, in rank order (a collective: every rank must call it)."""
    state = collect_random_states()
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [state]
    states: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(states, state)
    return states


class RandomStateCheckpoint(Callback):
    """Saves every rank's random-number states in each checkpoint and restores them when training resumes.

    Without it a run resumed from a checkpoint draws new dropout masks (and any other random
    numbers), so it ends close to, but not exactly where, the uninterrupted run ends.

    The states are taken while the checkpoint is written (on every rank, gathered to the
    checkpoint under ``"random_states"``) and put back at ``on_train_start`` of the resumed run:
    from there on the resumed run makes the same draws as the uninterrupted run made after the
    checkpoint (the data loaders' iterators, which draw one seed each, are created at the same
    points in both). Together with a data loader that resumes mid-epoch
    (:class:`~lego_lightning.data.blocks.ResumableDataLoader`) a resumed run is bit-identical to
    the uninterrupted one on the CPU. On a GPU that also needs deterministic kernels
    (``Trainer(deterministic=True)``, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` for cuBLAS).

    A checkpoint written by a different number of ranks restores what it has for the ranks it
    had and warns that the run is not an exact continuation. Older checkpoints without states
    restore nothing. The :class:`~lego_lightning.SupervisedExitLM` family adds this callback
    itself (``configure_callbacks``); add it to the Trainer for any other LightningModule.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = gather_random_states(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(CHECKPOINT_KEY)
        if not states:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(states)} ranks but this run has "
                f"{trainer.world_size}: the resumed run is not an exact continuation of the saved one"
            )
        rank = trainer.global_rank
        self._pending = states[rank] if rank < len(states) else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            restore_random_states(self._pending)
            self._pending = None
