"""``lego generate``: text from a trained model, through Lightning's predict loop.

:class:`PromptDataModule` holds the tokenizer (a checkpoint's own, or a pretrained folder's)
and the prompts, each with its own settings; :class:`Generator` wraps a trained module and
decodes every prompt of its process with the decoding engine
(:class:`~lego_lightning.decoding.Engine`), ``--batch_size`` of them at a time with continuous
batching: a prompt that ends makes room for the next at once. Lightning spreads the prompts over
``--trainer.devices``; every prompt keeps its index, so the results come back in order from any
number of processes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lego_lightning.checkpoint_io import read_checkpoint
from lego_lightning.data.tokenizer import TextTokenizer, load_tokenizer, tokenizer_from_state
from lego_lightning.decoding import Engine, Request, speculation_room

# What a JSON line of --prompts may set for its own prompt, over the command line's defaults.
PROMPT_SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "eos_token_id")


@dataclass
class Prompt:
    """A prompt's text and the settings of its own JSON line (the command line's fill in the rest)."""

    text: str
    settings: dict[str, Any] = field(default_factory=dict)


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


def read_prompts(prompt: Sequence[str] | None, prompts: str | Path | None) -> list[Prompt]:
    """``--prompt`` texts, then those of ``--prompts FILE``: one per line, or JSON lines with a ``text`` field
    and, if it likes, its own settings (:data:`PROMPT_SETTINGS`; other fields are the caller's own, ignored)."""
    texts = [Prompt(text) for text in prompt or []]
    if prompts is not None:
        path = Path(prompts).expanduser()
        if not path.is_file():
            raise ValueError(f"prompts={str(prompts)!r} is not a file")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"prompts={str(prompts)!r} is empty: give one prompt per line, or JSON lines")
        if path.suffix == ".jsonl":
            for number, line in enumerate(lines, start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"prompts={str(prompts)!r} line {number} is not JSON: {error}") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f'prompts={str(prompts)!r} line {number}: a JSON line needs a "text" string')
                texts.append(Prompt(row["text"], {k: row[k] for k in PROMPT_SETTINGS if k in row}))
        else:
            texts += [Prompt(line) for line in lines]
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
        self.tokenizer_source = tokenizer  # where it came from (a pretrained folder may hold a chat template beside)
        self.prompts: list[Prompt] = []
        self.ids: list[list[int]] = []

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def set_prompts(self, prompts: Sequence[Prompt], room: int, max_new_tokens: int) -> None:
        """Tokenize ``prompts``; each must be non-empty and leave its own ``max_new_tokens`` (its line's, else
        ``max_new_tokens``) within ``room`` (the context)."""
        self.prompts, self.ids = list(prompts), []
        for i, prompt in enumerate(self.prompts):
            ids = self.tokenizer.encode_prompt(prompt.text)
            if not ids:
                raise ValueError(f"prompt {i + 1} ({prompt.text!r}) has no tokens")
            new = prompt.settings.get("max_new_tokens", max_new_tokens)
            if isinstance(new, int) and len(ids) + new > room:
                raise ValueError(
                    f"prompt {i + 1} has {len(ids)} tokens; with max_new_tokens={new} that is {len(ids) + new}, "
                    f"longer than the model's context max_seq_len={room}: shorten the prompt or lower max_new_tokens"
                )
            self.ids.append(ids)

    def predict_dataloader(self) -> DataLoader:
        # One batch holds every prompt of a process: the engine schedules them over its slots itself.
        return DataLoader(list(range(len(self.ids))), batch_size=max(1, len(self.ids)), collate_fn=torch.tensor)


class Generator(L.LightningModule):
    """A trained module's model decoding prompts in ``predict_step``; checkpoints load into the module it wraps.

    ``settings`` are the engine's (``threshold``, ``confidence``, ``max_speculations``) and each request's defaults
    (``max_new_tokens``, ``draft_exit``, sampling...), which a prompt's own JSON line overrides;
    ``seed`` gives prompt ``i`` the seed ``seed + i`` unless its line has one, so a prompt gets the
    same text whatever else decodes beside it and on any device. ``slots`` prompts decode at once.
    """

    def __init__(
        self,
        module: L.LightningModule,
        tokenizer: TextTokenizer,
        prompts: PromptDataModule,
        settings: dict[str, Any],
        slots: int = 1,
    ) -> None:
        super().__init__()
        self.module = module
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.settings = dict(settings)
        self.slots = slots

    # The wrapped module's own setup (a pretrained module loads its weights there), then a checkpoint
    # of it: its hooks and weights, under its own names.
    def setup(self, stage: str) -> None:
        self.module.setup(stage)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.module.on_load_checkpoint(checkpoint)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def max_speculations(self) -> int:
        """The most drafts a round may make (the engine's cache room past a prompt's last token)."""
        default = speculation_room(self.settings.get("draft_exit"), self.settings.get("num_speculations", 4), 8)
        return self.settings.get("max_speculations", default)

    def request(self, index: int) -> Request:
        """Prompt ``index``'s request: the command line's settings, its own line's over them."""
        engine_settings = ("threshold", "confidence", "seed", "max_speculations")
        settings = {k: v for k, v in self.settings.items() if k not in engine_settings}
        seed = self.settings.get("seed")
        own = self.prompts.prompts[index].settings
        settings |= {"seed": None if seed is None else seed + index} | own
        return Request(self.prompts.ids[index], **settings)

    def check_requests(self) -> None:
        """Every prompt's request checked against the model before anything runs; an error names the prompt."""
        model = self.module.model
        routed = self.settings.get("threshold") is not None
        for index in range(len(self.prompts.ids)):
            try:
                self.request(index).check(model, routed, self.max_speculations)
            except (TypeError, ValueError) as error:
                raise ValueError(f"prompt {index + 1}: {error}") from None

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[dict[str, Any]]:
        model = self.module.model.eval()
        learned = self.settings.get("confidence") == "learned"
        engine = Engine(
            model,
            min(self.slots, len(batch)),
            threshold=self.settings.get("threshold"),
            confidence=self.settings.get("confidence", "max_prob"),
            hidden_confidence=self.module.hidden_confidence if learned else None,
            max_speculations=self.max_speculations,
        )
        index_of = {engine.add(self.request(index)): index for index in batch.tolist()}
        rows = []
        for request_id, done in sorted(engine.run().items()):
            index = index_of[request_id]
            prompt = self.prompts.ids[index]
            # The continuation as it reads after the prompt: a word tokenizer's space between them included.
            text = self.tokenizer.decode(prompt + done.tokens)[len(self.tokenizer.decode(prompt)) :]
            row: dict[str, Any] = {
                "index": index,
                "text": text,
                "tokens": len(done.tokens),
                # Its own tokens over its own time in a slot, sharing the batch with the others.
                "tokens_per_s": len(done.tokens) / done.seconds,
            }
            if self.settings.get("draft_exit") is not None:
                row |= {"drafts": done.drafts, "accepted": done.accepted}
            rows.append(row)
        return rows


def gather_results(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's results, once each and in prompt order (a distributed sampler repeats a few to even out)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, rows)
        rows = [row for part in everyone for row in part]
    return sorted({row["index"]: row for row in rows}.values(), key=lambda row: row["index"])
