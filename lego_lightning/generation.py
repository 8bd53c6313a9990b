"""``lego generate``: text from a trained model, through Lightning's predict loop.

:class:`PromptDataModule` holds the tokenizer (a checkpoint's own, or a pretrained folder's)
and turns prompts into left-padded batches; :class:`Generator` wraps a trained module and
decodes each batch with :func:`~lego_lightning.decoding.generate` at full depth, routed
or self-speculatively. Lightning spreads the batches over ``--trainer.devices``; every prompt
keeps its index, so the results come back in order from any number of processes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lego_lightning.checkpoint_io import read_checkpoint
from lego_lightning.data.tokenizer import TextTokenizer, load_tokenizer, tokenizer_from_state
from lego_lightning.decoding import generate


def tokenizer_of(source: str | Path) -> TextTokenizer:
    """The tokenizer of a ``lego fit`` checkpoint (``.ckpt``), or a ``tokenizer.json`` / a folder holding one."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix != ".json":
        checkpoint = read_checkpoint(path, mmap=True)
        for value in checkpoint.values():  # the data module's state: {"tokenizer": ...} or {"vocab": ...}
            if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("tokenizer", "vocab"):
                return tokenizer_from_state(next(iter(value.values())))
        raise ValueError(
            f"the checkpoint {str(source)!r} holds no tokenizer (its data module saved none): give one with "
            "--data.tokenizer PATH (a tokenizer.json, or a folder holding one)"
        )
    return load_tokenizer(path)


def read_prompts(prompt: Sequence[str] | None, prompts: str | Path | None) -> list[str]:
    """``--prompt`` texts, then those of ``--prompts FILE``: one per line, or JSON lines with a ``text`` field."""
    texts = list(prompt or [])
    if prompts is not None:
        path = Path(prompts).expanduser()
        if not path.is_file():
            raise ValueError(f"prompts={str(prompts)!r} is not a file")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"prompts={str(prompts)!r} is empty: give one prompt per line, or JSON lines")
        if path.suffix == ".jsonl":
            for number, line in enumerate(lines, start=1):
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f'prompts={str(prompts)!r} line {number}: a JSON line needs a "text" string')
                texts.append(row["text"])
        else:
            texts += lines
    if not texts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    return texts


class PromptDataModule(L.LightningDataModule):
    """Prompts in left-padded batches, in the tokenizer the model was trained with.

    Args:
        tokenizer: a ``lego fit`` checkpoint holding its tokenizer, a ``tokenizer.json``, or a
            folder holding one (a pretrained model's). ``lego generate`` fills it in from
            ``--ckpt_path`` or ``--model.pretrained``.
    """

    def __init__(self, tokenizer: str | None = None) -> None:
        super().__init__()
        if tokenizer is None:
            raise ValueError(
                "lego generate needs the model's tokenizer: give --ckpt_path (a lego fit checkpoint) or "
                "--model.pretrained DIR, or --data.tokenizer PATH"
            )
        self.tokenizer = tokenizer_of(tokenizer)
        self.prompts: list[list[int]] = []
        self.texts: list[str] = []
        self.batch_size = 1

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def set_prompts(self, texts: Sequence[str], batch_size: int, room: int, max_new_tokens: int) -> None:
        """Tokenize ``texts``; each must be non-empty and leave ``max_new_tokens`` within ``room`` (the context)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: allowed a positive integer")
        self.texts, self.batch_size, self.prompts = list(texts), batch_size, []
        for i, text in enumerate(self.texts):
            ids = self.tokenizer.encode_prompt(text)
            if not ids:
                raise ValueError(f"prompt {i + 1} ({text!r}) has no tokens")
            if len(ids) + max_new_tokens > room:
                raise ValueError(
                    f"prompt {i + 1} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                    f"{len(ids) + max_new_tokens}, longer than the model's context max_seq_len={room}: shorten the "
                    "prompt or lower max_new_tokens"
                )
            self.prompts.append(ids)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(list(range(len(self.prompts))), batch_size=self.batch_size, collate_fn=self._left_padded)

    def _left_padded(self, indices: list[int]) -> dict[str, Tensor]:
        width = max(len(self.prompts[i]) for i in indices)
        ids = torch.zeros(len(indices), width, dtype=torch.long)
        mask = torch.zeros(len(indices), width, dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(self.prompts[i])
            ids[row, width - n :] = torch.tensor(self.prompts[i])
            mask[row, width - n :] = 1
        return {"index": torch.tensor(indices), "ids": ids, "mask": mask}


class Generator(L.LightningModule):
    """A trained module's model decoding prompts in ``predict_step``; checkpoints load into the module it wraps.

    ``settings`` are :func:`~lego_lightning.decoding.generate`'s keyword arguments
    (``max_new_tokens``, ``threshold``, ``draft_exit``, sampling...); ``seed`` gives prompt ``i``
    the seed ``seed + i``, so a prompt gets the same text in any batch and on any device.
    """

    def __init__(self, module: L.LightningModule, tokenizer: TextTokenizer, settings: dict[str, Any]) -> None:
        super().__init__()
        self.module = module
        self.tokenizer = tokenizer
        self.settings = dict(settings)

    # The wrapped module's own setup (a pretrained module loads its weights there), then a checkpoint
    # of it: its hooks and weights, under its own names.
    def setup(self, stage: str) -> None:
        self.module.setup(stage)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.module.on_load_checkpoint(checkpoint)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> list[dict[str, Any]]:
        settings = dict(self.settings)
        seed = settings.pop("seed", None)
        model = self.module.model.eval()
        if settings.get("confidence") == "learned":
            settings["hidden_confidence"] = self.module.hidden_confidence
        start = time.perf_counter()
        out = generate(
            model,
            batch["ids"],
            attention_mask=batch["mask"],
            seed=None if seed is None else [seed + int(i) for i in batch["index"]],
            **settings,
        )
        seconds = time.perf_counter() - start
        width = batch["ids"].shape[1]
        made = (out.exit_position >= 0).sum(1)
        rows = []
        for row, index in enumerate(batch["index"].tolist()):
            prompt = out.tokens[row, :width][batch["mask"][row].bool()].tolist()
            ids = out.tokens[row, width : width + int(made[row])].tolist()
            # The continuation as it reads after the prompt: a word tokenizer's space between them included.
            text = self.tokenizer.decode(prompt + ids)[len(self.tokenizer.decode(prompt)) :]
            result: dict[str, Any] = {
                "index": index,
                "text": text,
                "tokens": len(ids),
                "tokens_per_s": float(made.sum()) / seconds,  # the batch's: its rows decode together
            }
            if out.drafts is not None:
                result |= {"drafts": int(out.drafts[row]), "accepted": int(out.accepted[row])}
            rows.append(result)
        return rows


def gather_results(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's results, once each and in prompt order (a distributed sampler repeats a few to even out)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, rows)
        rows = [row for part in everyone for row in part]
    return sorted({row["index"]: row for row in rows}.values(), key=lambda row: row["index"])
