"""Checkpoint files: atomic writes that leave earlier checkpoints whole, and reads that say what is wrong."""

import contextlib
import errno
import pickle
import resource

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lego_lightning.callbacks import BestAndLastCheckpoint
from lego_lightning.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointWriteError,
    read_checkpoint,
    temporary_path,
)
from tests.helpers import quiet_trainer, synthetic, tiny_lm

CHECKPOINT = {"state_dict": {"w": torch.arange(1000.0)}, "global_step": 3}


class Unsafe:
    """Not allowed by weights_only loading."""


def write_bad_files(folder):
    torch.save(CHECKPOINT, folder / "good.ckpt")
    blob = (folder / "good.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(blob[: len(blob) // 2])
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "text.ckpt").write_text("not a checkpoint\n")
    (folder / "pickle.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    torch.save({"weights": torch.ones(2)}, folder / "no_state_dict.ckpt")
    torch.save([torch.ones(2)], folder / "list.ckpt")
    torch.save({"state_dict": {}, "x": Unsafe()}, folder / "unsafe.ckpt")
    (folder / "folder.ckpt").mkdir()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.ckpt", r"'.*missing.ckpt' does not exist; checkpoints in .*: empty.ckpt, good.ckpt"),
        ("folder.ckpt", r"is a folder, not a checkpoint file"),
        ("empty.ckpt", r"is empty \(0 bytes\): the run that wrote it stopped before it finished; resume from an"),
        ("truncated.ckpt", r"is truncated or corrupt \(\d+ bytes, its end is missing\)"),
        ("text.ckpt", r"is not a PyTorch checkpoint \(it starts with b'not '\)"),
        ("pickle.ckpt", r"is not a PyTorch checkpoint"),
        ("no_state_dict.ckpt", r"is a PyTorch file but not a Lightning checkpoint: it holds keys \['weights'\]"),
        ("list.ckpt", r"is a PyTorch file but not a Lightning checkpoint: it holds a list"),
        ("unsafe.ckpt", r"holds Python objects that safe loading \(weights_only=True\) refuses \(.*Unsafe"),
    ],
)
def test_a_bad_checkpoint_file_is_named_with_what_is_wrong(tmp_path, name, message):
    write_bad_files(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(tmp_path / name)
    assert read_checkpoint(tmp_path / "good.ckpt")["global_step"] == 3


@contextlib.contextmanager
def file_size_limit(n_bytes):
    """Writes past ``n_bytes`` fail with EFBIG (Python ignores SIGXFSZ), as a full disk fails them with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_write_leaves_the_previous_checkpoint_whole_and_names_the_file(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint(CHECKPOINT, target)
    bigger = {"state_dict": {"w": torch.arange(100_000.0)}, "global_step": 4}
    with file_size_limit(50_000), pytest.raises(CheckpointWriteError) as failure:
        io.save_checkpoint(bigger, target)
    assert str(target) in str(failure.value) and "File too large" in str(failure.value)
    assert failure.value.errno == errno.EFBIG
    assert read_checkpoint(target)["global_step"] == 3  # the old one, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary left
    io.save_checkpoint(bigger, target)
    assert read_checkpoint(target)["global_step"] == 4


def test_a_temporary_file_left_by_a_killed_write_goes_with_the_next_write(tmp_path):
    target = tmp_path / "last.ckpt"
    stale = temporary_path(target).with_name(f".last.ckpt.{99999}.tmp")
    stale.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint(CHECKPOINT, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_best_and_last_checkpoint_installs_the_atomic_writer_only_over_lightnings_default(tmp_path):
    trainer = quiet_trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[BestAndLastCheckpoint()])
    trainer.fit(tiny_lm(), synthetic())
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO

    class Custom(TorchCheckpointIO):
        pass

    custom = Custom()
    trainer = quiet_trainer(
        tmp_path / "b", max_steps=1, enable_checkpointing=True, callbacks=[BestAndLastCheckpoint()], plugins=[custom]
    )
    trainer.fit(tiny_lm(), synthetic())
    assert trainer.strategy.checkpoint_io is custom


def test_resuming_from_a_truncated_checkpoint_in_python_says_so(tmp_path):
    trainer = quiet_trainer(
        tmp_path,
        max_steps=2,
        enable_checkpointing=True,
        callbacks=[BestAndLastCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(tiny_lm(), synthetic())
    blob = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(blob[: len(blob) // 3])
    again = quiet_trainer(
        tmp_path, max_steps=4, enable_checkpointing=True, callbacks=[BestAndLastCheckpoint(dirpath=tmp_path)]
    )
    with pytest.raises(CheckpointError, match=r"cut.ckpt' is truncated or corrupt"):
        again.fit(tiny_lm(), synthetic(), ckpt_path=tmp_path / "cut.ckpt")
