"""Checkpoint files: written atomically, read with errors that say what is wrong with the file and what to do.

Lightning writes a checkpoint through an fsspec transaction that puts the bytes in a
temporary file in the system's temp folder and then moves it into place; across file
systems the move is a copy, and a full disk leaves a truncated ``best-*.ckpt`` that looks
real. :class:`AtomicCheckpointIO` writes next to the target and renames, so a checkpoint's
name only ever holds a whole checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, empty, truncated, not a checkpoint, or another model's."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; the file it would have replaced, and every other checkpoint, are intact."""


def _other_checkpoints(folder: Path, besides: Path | None = None) -> str:
    """``"; checkpoints in <folder>: a.ckpt, ..."`` (all but ``besides``), or ``""``: where to resume from."""
    others = sorted(p.name for p in folder.glob("*.ckpt") if p != besides and p.is_file()) if folder.is_dir() else []
    if not others:
        return ""
    return f"; checkpoints in {folder}: {', '.join(others[:6])}" + (" ..." if len(others) > 6 else "")


def read_checkpoint(
    path: str | os.PathLike[str], map_location: Any = "cpu", weights_only: bool | None = True, mmap: bool = False
) -> dict[str, Any]:
    """``torch.load`` of a local checkpoint file, with a :class:`CheckpointError` that names the file and the problem.

    The problems told apart: the file does not exist, is a folder, is empty (a write that
    never finished), is truncated or corrupt, is not a PyTorch file, holds objects that
    ``weights_only`` loading refuses, or is a PyTorch file but not a Lightning checkpoint.
    ``mmap=True`` maps the tensors instead of reading them (to look at a checkpoint's settings).
    """
    file = Path(path).expanduser()
    where = f"the checkpoint {str(path)!r}"
    elsewhere = _other_checkpoints(file.parent, file)
    if not file.exists():
        raise CheckpointError(f"{where} does not exist{elsewhere}")
    if file.is_dir():
        raise CheckpointError(f"{where} is a folder, not a checkpoint file{_other_checkpoints(file)}")
    size = file.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{where} is empty (0 bytes): the run that wrote it stopped before it finished; "
            f"resume from an earlier checkpoint{elsewhere}"
        )
    with file.open("rb") as f:
        head = f.read(4)
    is_zip = head == ZIP_MAGIC
    if is_zip and not zipfile.is_zipfile(file):
        raise CheckpointError(
            f"{where} is truncated or corrupt ({size} bytes, its end is missing): the run that wrote it stopped "
            f"before it finished; resume from an earlier checkpoint{elsewhere}"
        )
    not_torch = f"{where} is not a PyTorch checkpoint (it starts with {head!r})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols, beside the point here
            checkpoint = torch.load(file, map_location=map_location, weights_only=weights_only, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        if not is_zip:
            raise CheckpointError(not_torch) from None
        lines = [line.strip() for line in str(err).splitlines() if "Unsupported" in line or "error:" in line]
        raise CheckpointError(
            f"{where} holds Python objects that safe loading (weights_only=True) refuses"
            + (f" ({lines[0]})" if lines else "")
            + ". Load it with torch.load(..., weights_only=False) only if you trust where it comes from"
        ) from None
    except Exception as err:  # torch's unpickler raises KeyError, EOFError, RuntimeError... on garbage
        if not is_zip:
            raise CheckpointError(not_torch) from None
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{where} is truncated or corrupt: {cause}{elsewhere}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        what = (
            f"a {type(checkpoint).__name__}" if not isinstance(checkpoint, dict) else f"keys {sorted(checkpoint)[:5]}"
        )
        raise CheckpointError(
            f"{where} is a PyTorch file but not a Lightning checkpoint: it holds {what}, no 'state_dict'"
        )
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that writes each checkpoint whole or not at all, and reads with clear errors.

    A checkpoint is written to a hidden temporary file in the target's folder, flushed to
    disk, then renamed onto the target (an atomic replace on POSIX and Windows). When writing
    fails (a full disk, no permission), the temporary file is removed, the previous file of
    that name and every other checkpoint stay as they were, and a
    :class:`CheckpointWriteError` names the file and the cause. Remote paths (``s3://``...)
    keep Lightning's own writer. Reading goes through :func:`read_checkpoint`.

    :class:`~lego_lightning.callbacks.BestAndLastCheckpoint` installs it on a Trainer that
    uses Lightning's default; pass ``Trainer(plugins=[AtomicCheckpointIO()])`` otherwise.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        temporary = temporary_path(target)
        # Serialized in memory first (as Lightning does): torch's zip writer turns a failed write into a
        # RuntimeError without its cause, while a plain write raises the OSError that says what went wrong.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with temporary.open("wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        except OSError as err:
            with contextlib.suppress(OSError):
                temporary.unlink()
            failure = CheckpointWriteError(
                f"could not write the checkpoint {target}: {err.strerror or err}. Nothing was written under that "
                "name; the checkpoints written before are intact"
            )
            failure.errno = err.errno
            raise failure from err
        _fsync_folder(target.parent)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a run killed while writing
            with contextlib.suppress(OSError):
                stale.unlink()

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)


def temporary_path(target: Path) -> Path:
    """Where :class:`AtomicCheckpointIO` writes ``target`` before the rename: hidden, same folder, no ``.ckpt``."""
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def _is_local(path: Any) -> bool:
    return isinstance(get_filesystem(str(path)), LocalFileSystem)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
