"""The ``lego`` command: LightningCLI with TensorBoard, an LR monitor, exit diagnostics and checkpoints by default.

    lego fit --config configs/deep_supervision.yaml
    lego validate --config configs/deep_supervision.yaml --ckpt_path <checkpoint>
    lego generate --ckpt_path <checkpoint> --prompt "The meaning of" --draft_exit 4
    lego serve --ckpt_path <checkpoint> --draft_exit auto --num_speculations auto --port 8000

``vocab_size`` flows from the data module to the model, so nobody types it. Bad input ends
the command with its message alone and exit status 2; ``LEGO_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lego_lightning.callbacks.checkpoint import DEFAULT_FILENAME, BestAndLastCheckpoint
from lego_lightning.callbacks.exit_diagnostics import ExitDiagnostics
from lego_lightning.checkpoint_io import CheckpointError, read_checkpoint
from lego_lightning.decoding import check_decoding, speculation_room
from lego_lightning.generation import Generator, PromptDataModule, gather_results, read_prompts
from lego_lightning.modules import SupervisedExitLM
from lego_lightning.modules.phase import as_phase

# Lightning's own names for a checkpoint it finds by itself (``registry:<name>`` too); anything else is a path.
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
# Errors that come from what the user gave (a config, data, a checkpoint, a trainer flag):
# the message is the whole story. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError, MisconfigurationException)
# Subcommands that are methods of LegoCLI (not of the trainer): they read prompts, not a corpus, and train nothing.
OWN_SUBCOMMANDS = ("generate", "serve")
# Warnings about things a `lego` user cannot act on: Lightning asks for callbacks that the
# model adds itself, and torch's pytree deprecation comes from inside Lightning.
QUIET = (
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided",
    r".*isinstance\(treespec, LeafSpec\).*",
)


class LearningRateMonitorIfLogging(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor``, idle when the trainer has no logger.

    The CLI always adds one; the stock callback raises when ``--trainer.logger false``.
    """

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def debug_mode() -> bool:
    """``LEGO_DEBUG=1``: errors keep their tracebacks and jsonargparse its full usage."""
    return os.environ.get("LEGO_DEBUG", "0") not in ("", "0")


def _import_class(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_writable_folder(folder: str | os.PathLike[str], field: str) -> None:
    """Create ``folder`` if needed and check that a file can be written in it; a ``ValueError`` names ``field``."""
    path = Path(folder).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{field}={str(folder)!r} cannot be a folder: {existing} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{field}={str(folder)!r} is not writable: {err.strerror or err}") from None


# Lines of jsonargparse's messages that are bookkeeping, not the problem: which types a value was
# tried against, and the value it was given, dumped whole.
PARSE_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:$|Expected a <class 'NoneType'>"
    r"|Given value type: |Given value: )"
)


def concise_parse_error(message: str) -> str:
    """jsonargparse's message for a bad option, on one line and without the union bookkeeping."""
    kept = [line.strip().removeprefix("- ") for line in message.splitlines()]
    return " ".join(line for line in kept if line and not PARSE_NOISE.match(line))


class LegoArgumentParser(LightningArgumentParser):
    """Lightning's parser; a bad option ends with one line that says what is wrong, not the whole usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_mode():
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        if rank_zero_only.rank == 0:
            print(f"lego: error: {concise_parse_error(message)}\n  (the options: {prog} --help)", file=sys.stderr)
        self.exit(2)


class LegoCLI(LightningCLI):
    """LightningCLI for lego_lightning models and data modules (any subclass, chosen by ``class_path``).

    Beyond Lightning's: a checkpoint given with ``--ckpt_path`` is checked and its
    hyperparameters fill in what the config leaves out; a ``fit`` resumed from a checkpoint
    inside ``<save_dir>/<name>/version_N/checkpoints/`` logs on in ``version_N``; log folders
    are checked before anything runs; settings that would train nothing are refused.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", SupervisedExitLM)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", LegoArgumentParser)
        # What the --ckpt_path checkpoint says about itself (read before parsing): its hyperparameters and step.
        self.checkpoint: dict[str, Any] | None = None
        self.checkpoint_path: Path | None = None
        super().__init__(*args, **kwargs)

    # --------------------------------------------------------------------------- parsing
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands, ``generate`` (:meth:`generate`) and ``serve`` (:meth:`serve`), each with the
        arguments it skips."""
        return {**LightningCLI.subcommands(), **{name: {"model", "datamodule"} for name in OWN_SUBCOMMANDS}}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's, where ``generate`` and ``serve`` are methods of this class rather than of the trainer."""
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands()
        for subcommand in self.subcommands():
            klass = type(self) if subcommand in OWN_SUBCOMMANDS else self.trainer_class
            description = (getattr(klass, subcommand).__doc__ or "").strip().splitlines()[0]
            options = {"description": description, **kwargs.get(subcommand, {})}
            subcommand_parser = self._prepare_subcommand_parser(klass, subcommand, **options)
            if subcommand in OWN_SUBCOMMANDS:
                # Generation reads prompts, not a corpus, and logs nothing.
                subcommand_parser.set_defaults(
                    {"data": {"class_path": f"{PromptDataModule.__module__}.PromptDataModule"}, "trainer.logger": False}
                )
            self._subcommand_parsers[subcommand] = subcommand_parser
            subcommands.add_subcommand(subcommand, subcommand_parser, help=description)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        raw = sys.argv[1:] if args is None else args
        from_command_line = False
        if isinstance(raw, list):
            raw = repeated_prompts_as_one_list(raw)
            self._checkpoint_hparams_as_defaults(raw)
            # The command line itself, its prompts gathered, goes in as args: Lightning's warning then says nothing.
            from_command_line = args is None and raw != sys.argv[1:]
            args = raw if args is not None or from_command_line else None
        with warnings.catch_warnings():
            if from_command_line:
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand not in OWN_SUBCOMMANDS:  # Lightning's looks the trainer's method up first
            return super()._run_subcommand(subcommand)
        getattr(self, subcommand)(**self._prepare_subcommand_kwargs(subcommand))

    def _set_seed(self) -> None:
        """Lightning's, but not for ``generate`` and ``serve``: each prompt samples from its own seed, and greedy
        decoding draws nothing (seeding the process said "No seed found, seed set to 0" at every call)."""
        if self.subcommand not in OWN_SUBCOMMANDS:
            super()._set_seed()

    def _checkpoint_hparams_as_defaults(self, raw: list[str]) -> None:
        """Make a checkpoint's model hyperparameters the defaults, below the config and the command line.

        Lightning's own ``_parse_ckpt_path`` lets them override both, which silently ignores
        ``--model.routing_threshold`` at validation and hides a config that does not fit the
        checkpoint. Here the config wins, and a config whose shapes differ from the
        checkpoint's fails with a clear error when the weights load; with no model config at
        all, the checkpoint's is used. Only ``--ckpt_path`` on the command line is read here;
        a path that is not a usable checkpoint fails here, before anything is built.
        """
        subparsers = getattr(self, "_subcommand_parsers", {})  # none with run=False
        subcommand = next((a for a in raw if a in subparsers), None)
        ckpt_path = None
        for i, arg in enumerate(raw):
            if arg == "--ckpt_path" and i + 1 < len(raw):
                ckpt_path = raw[i + 1]
            elif arg.startswith("--ckpt_path="):
                ckpt_path = arg.split("=", 1)[1]
        if subcommand is None or not ckpt_path or ckpt_path.split(":")[0] in CKPT_KEYWORDS:
            return
        # Mapped, not read, and only its settings kept: Lightning loads the weights itself.
        saved = read_checkpoint(ckpt_path, mmap=True)
        self.checkpoint = {key: saved.get(key) for key in ("hyper_parameters", "global_step")}
        del saved
        self.checkpoint_path = Path(ckpt_path)
        hparams = self.checkpoint["hyper_parameters"] or {}
        class_path = hparams.get("_class_path")
        if class_path is None:
            return
        # vocab_size is linked from the data; the data module checks the saved vocabulary itself.
        init_args = {k: v for k, v in hparams.items() if not k.startswith("_") and k != "vocab_size"}
        subparsers[subcommand].set_defaults({"model": {"class_path": class_path, "init_args": init_args}})

    def _parse_ckpt_path(self) -> None:
        """Replaced by :meth:`_checkpoint_hparams_as_defaults`, which runs before parsing."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/ppl",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": DEFAULT_FILENAME,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs", "default_hp_metric": False},
                },
            }
        )
        parser.add_lightning_class_args(LearningRateMonitorIfLogging, "lr_monitor")
        parser.add_lightning_class_args(ExitDiagnostics, "exit_diagnostics")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        if self.subcommand in OWN_SUBCOMMANDS:
            # The checkpoint, learning-rate and diagnostics callbacks the CLI adds watch training, and
            # there is no run whose config.yaml to keep (it would land in the working folder).
            callbacks, self.save_config_callback = [], None
        if config.get("enable_checkpointing") is False:
            # The checkpoint callback the CLI builds from --checkpoint.* goes: Lightning refuses
            # enable_checkpointing=False beside a ModelCheckpoint (one the user lists stays, and is refused).
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    # ----------------------------------------------------------------- before anything runs
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._check_phases(config)
        self._tokenize_as_the_pretrained_model(config)
        if self.subcommand in OWN_SUBCOMMANDS:
            self._prompts_in_the_models_tokenizer(config)
        if self.checkpoint is not None:
            self._check_checkpoint_class(config)
            if self.subcommand == "fit":
                self._log_on_in_the_checkpoints_version(config)

    @staticmethod
    def _check_phases(config: Any) -> None:
        """A phase plan's errors name the phase (``model.init_args.phases[1].patience=-1 ...``), before anything is
        built: jsonargparse would report the first bad ``Phase`` without saying which one it is."""
        phases = getattr(getattr(config.get("model"), "init_args", None), "phases", None)
        for i, phase in enumerate(phases or []):
            fields = vars(phase) if hasattr(phase, "__dict__") else phase
            try:
                as_phase(dict(fields), i)
            except ValueError as err:
                raise ValueError(f"model.init_args.{err}") from None

    @staticmethod
    def _tokenize_as_the_pretrained_model(config: Any) -> None:
        """With ``model.pretrained`` and no ``data.tokenizer``, the data is tokenized as the checkpoint was."""
        pretrained = getattr(getattr(config.get("model"), "init_args", None), "pretrained", None)
        data_args = getattr(config.get("data"), "init_args", None)
        if pretrained and data_args is not None and "tokenizer" in data_args and data_args["tokenizer"] is None:
            from lego_lightning.model.pretrained import resolve

            data_args["tokenizer"] = str(resolve(pretrained))

    @staticmethod
    def _prompts_in_the_models_tokenizer(config: Any) -> None:
        """``generate`` reads prompts (:class:`PromptDataModule`), whatever data a config names, in the tokenizer of
        ``--data.tokenizer``, else of the checkpoint (``--ckpt_path``), else of ``--model.pretrained``."""
        data = config.get("data")
        given = getattr(getattr(data, "init_args", None), "tokenizer", None)
        if getattr(data, "class_path", "").rpartition(".")[2] != PromptDataModule.__name__:
            given = None  # a training corpus' tokenizer setting (bpe, word...) names no file
        pretrained = getattr(getattr(config.get("model"), "init_args", None), "pretrained", None)
        tokenizer = given or config.get("ckpt_path") or pretrained
        if pretrained and tokenizer == pretrained:
            from lego_lightning.model.pretrained import resolve

            tokenizer = str(resolve(pretrained))
        config["data"] = Namespace(
            class_path=f"{PromptDataModule.__module__}.PromptDataModule", init_args=Namespace(tokenizer=tokenizer)
        )

    def _check_checkpoint_class(self, config: Any) -> None:
        """A checkpoint of another model class fails here, not on an argument that class does not take."""
        saved = (self.checkpoint["hyper_parameters"] or {}).get("_class_path")
        wanted = getattr(config.get("model"), "class_path", None)
        if saved is None or wanted is None or _import_class(saved) is _import_class(wanted):
            return
        assert self.checkpoint_path is not None
        beside = self.checkpoint_path.resolve().parent.parent / "config.yaml"
        hint = f" ({beside})" if beside.is_file() else ""
        raise CheckpointError(
            f"the checkpoint {str(self.checkpoint_path)!r} was written by {saved.rpartition('.')[2]} but the config "
            f"builds {wanted.rpartition('.')[2]}: use the config it was trained with{hint}, or leave the model out "
            "of the config and the checkpoint's own settings are used"
        )

    def _log_on_in_the_checkpoints_version(self, config: Any) -> None:
        """Resuming from ``<save_dir>/<name>/version_N/checkpoints/x.ckpt`` logs on in ``version_N``.

        Both halves of a killed run (and both phases of a phased one) then share one folder
        and one TensorBoard step axis. An explicit ``version`` on the command line wins.
        """
        logger = config.get("trainer", {}).get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is None or init_args.get("version") is not None or init_args.get("save_dir") is None:
            return
        assert self.checkpoint_path is not None
        folder = self.checkpoint_path.resolve().parent
        match = re.fullmatch(r"version_(\d+)", folder.parent.name)
        name = init_args.get("name") or "lightning_logs"
        if folder.name != "checkpoints" or match is None:
            return
        if folder.parent.parent != (Path(init_args["save_dir"]).expanduser() / name).resolve():
            return
        init_args["version"] = int(match.group(1))
        if "purge_step" in init_args and init_args["purge_step"] is None:
            # TensorBoard hides what the killed run logged after its checkpoint: the resumed run logs it again.
            init_args["purge_step"] = int(self.checkpoint["global_step"])

    def _check_log_folders(self) -> None:
        trainer = self.trainer
        for logger in trainer.loggers:
            if getattr(logger, "save_dir", None) is not None:
                check_writable_folder(logger.save_dir, f"trainer.logger ({type(logger).__name__}) save_dir")
        check_writable_folder(trainer.default_root_dir, "trainer.default_root_dir")
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                check_writable_folder(callback.dirpath, "checkpoint.dirpath")

    def before_fit(self) -> None:
        self._check_log_folders()
        self._trainer_callbacks = list(self.trainer.callbacks)
        if self.checkpoint is not None:  # a resumed run writes on in its own checkpoint folder
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")

    def before_validate(self) -> None:
        self._check_log_folders()

    def before_test(self) -> None:
        self._check_log_folders()

    # ---------------------------------------------------------------------------- generate
    def generate(
        self,
        model: LightningModule,
        datamodule: PromptDataModule,
        ckpt_path: str | None = None,
        prompt: list[str] | None = None,
        prompts: str | None = None,
        output: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 1,
        threshold: float | None = None,
        confidence: str = "max_prob",
        draft_exit: int | Literal["auto"] | None = None,
        num_speculations: int | Literal["auto"] = 4,
        max_speculations: int = 8,
        draft_threshold: float | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        """Generate text from a checkpoint (--ckpt_path) or a pretrained model (--model.pretrained).

        Args:
            ckpt_path: a checkpoint of ``lego fit``; its model settings and tokenizer come with it.
            prompt: a text to continue (repeatable).
            prompts: a file of prompts: one per line, or JSON lines with a ``text`` field (``.jsonl``) and, if
                it likes, its own ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed`` and
                ``eos_token_id`` over the command line's.
            output: write JSON lines here (prompt, text, tokens, drafts, accepted, tokens_per_s)
                instead of printing the texts.
            max_new_tokens: tokens to generate after each prompt.
            batch_size: prompts decoded at once (the engine's slots): one that ends makes room for the next.
            threshold: routed decoding: a token leaves at its first exit whose ``confidence``
                reaches it (``None``: full depth).
            confidence: the confidence measure of routing and of ``draft_threshold``.
            draft_exit: self-speculative decoding: the exit that drafts; the layers above verify,
                so the tokens are the full model's. ``auto``: each prompt's exit, or none, chosen every
                round by the speed it expects from what each exit's drafts would have kept so far.
            num_speculations: the most tokens a self-speculative round drafts; ``auto``: chosen every round,
                up to ``max_speculations``.
            max_speculations: the most tokens ``num_speculations auto`` drafts in a round.
            draft_threshold: a row stops drafting where the draft exit's confidence falls below it.
            temperature: 0 decodes greedily; above, tokens are sampled.
            top_k: sample among the k most likely tokens.
            top_p: sample among the most likely tokens whose probability reaches p.
            seed: prompt ``i`` samples with seed ``seed + i``, alike in any batch and on any device.
            eos_token_id: a prompt's text ends at this token.
        """
        texts = read_prompts(prompt, prompts)
        net = model.model
        # What generate() would refuse, refused before the weights load or anything runs.
        check_decoding(
            net, max_new_tokens, threshold, draft_exit, num_speculations, draft_threshold, temperature, top_k, top_p,
            confidence, getattr(model, "hidden_confidence", None), max_speculations,
        )  # fmt: skip
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: allowed a positive integer (prompts decoded at once)")
        settings = dict(
            max_new_tokens=max_new_tokens, threshold=threshold, confidence=confidence, draft_exit=draft_exit,
            num_speculations=num_speculations, draft_threshold=draft_threshold, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, eos_token_id=eos_token_id,
            max_speculations=speculation_room(draft_exit, num_speculations, max_speculations),
        )  # fmt: skip
        if output is not None:
            check_writable_folder(Path(output).expanduser().resolve().parent, "output")
        datamodule.set_prompts(texts, net.config.max_seq_len, max_new_tokens)
        generator = Generator(model, datamodule.tokenizer, datamodule, settings, slots=batch_size)
        generator.check_requests()
        batches = self.trainer.predict(generator, datamodule=datamodule, ckpt_path=ckpt_path)
        rows = gather_results([row for batch in batches or [] for row in batch])
        if self.trainer.global_rank != 0:
            return
        for row in rows:
            row["prompt"] = datamodule.prompts[row.pop("index")].text
        if output is not None:
            with open(Path(output).expanduser(), "w", encoding="utf-8") as file:
                for row in rows:
                    file.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(f"wrote {len(rows)} generations to {output}")
            return
        for row in rows:
            print(f"{row['prompt']}{row['text']}\n")

    # ---------------------------------------------------------------------------- serve
    def serve(
        self,
        model: LightningModule,
        datamodule: PromptDataModule,
        ckpt_path: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        slots: int = 8,
        api_key: str | None = None,
        max_queue: int = 64,
        max_body_bytes: int = 1_000_000,
        grace_period: float = 30.0,
        accelerator: str = "auto",
        devices: int | str = 1,
        max_new_tokens: int = 64,
        threshold: float | None = None,
        confidence: str = "max_prob",
        draft_exit: int | Literal["auto"] | None = None,
        num_speculations: int | Literal["auto"] = 4,
        max_speculations: int = 8,
        draft_threshold: float | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        """Serve a checkpoint (--ckpt_path) or a pretrained model (--model.pretrained) behind OpenAI's API.

        ``POST /v1/completions``, ``POST /v1/chat/completions`` (when the tokenizer has a chat template),
        ``GET /v1/models`` and ``GET /health``, on LitServe: ``slots`` requests decode at once in the engine's
        continuous batch, and each streams its tokens as the full model verifies them. The decoding settings
        are those of ``lego generate``; a request's ``max_tokens``, ``temperature``, ``top_p``, ``top_k`` and
        ``seed`` override them. SIGTERM lets the requests in flight finish, then exits 0.

        Args:
            ckpt_path: a checkpoint of ``lego fit``, loaded weights only; its model settings and tokenizer
                come with it.
            host: the address to bind (``0.0.0.0`` serves other machines too: give an ``api_key``).
            port: the port to bind.
            slots: requests decoded at once; the others wait for a slot.
            api_key: every request must send ``Authorization: Bearer <api_key>`` (else 401); default: the
                environment's ``LEGO_API_KEY``, else none.
            max_queue: requests admitted at once (decoding or waiting); past it, 429 at once.
            max_body_bytes: a larger request body gets 413.
            grace_period: seconds that SIGTERM leaves the requests in flight to finish.
            accelerator: LitServe's (``cpu``, ``cuda``, ``auto``...).
            devices: LitServe's devices (one worker each).
            max_new_tokens: a request's ``max_tokens`` when it gives none (shortened to what its prompt leaves
                of the context).
            threshold: routed decoding: a token leaves at its first exit whose ``confidence`` reaches it.
            confidence: the confidence measure of routing and of ``draft_threshold``.
            draft_exit: self-speculative decoding's draft exit, or ``auto`` (chosen every round).
            num_speculations: the most tokens a round drafts, or ``auto``.
            max_speculations: the most tokens ``num_speculations auto`` drafts.
            draft_threshold: a row stops drafting where the draft exit's confidence falls below it.
            temperature: the default temperature (0: greedy).
            top_k: the default top-k.
            top_p: the default top-p.
            seed: the default seed (prompt ``i`` of a request samples with ``seed + i``).
            eos_token_id: a request ends at this token.
        """
        from lego_lightning.serve import EngineAPI, Limits, OpenAISpec, build_server, run_server
        from lego_lightning.serve.spec import chat_template_of

        net = model.model
        check_decoding(
            net, max_new_tokens, threshold, draft_exit, num_speculations, draft_threshold, temperature, top_k, top_p,
            confidence, getattr(model, "hidden_confidence", None), max_speculations,
        )  # fmt: skip
        if host not in ("127.0.0.1", "0.0.0.0", "::"):
            raise ValueError(f"host={host!r}: allowed 127.0.0.1 (this machine only), 0.0.0.0 or :: (every address)")
        if not isinstance(port, int) or not 1024 <= port <= 65535:
            raise ValueError(f"port={port!r}: allowed 1024 to 65535")
        # Weights only, as `lego generate` loads them: the module's own setup, then the checkpoint's hooks and weights.
        model.trainer = self.trainer  # its setup reads the trainer's data module (none here)
        model.setup("predict")
        if ckpt_path is not None:
            checkpoint = read_checkpoint(ckpt_path)
            model.on_load_checkpoint(checkpoint)
            model.load_state_dict(checkpoint["state_dict"])
        room = speculation_room(draft_exit, num_speculations, max_speculations)
        learned = confidence == "learned"
        engine = dict(threshold=threshold, confidence=confidence, max_speculations=room,
                      hidden_confidence=model.hidden_confidence if learned else None)  # fmt: skip
        defaults = dict(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
            draft_exit=draft_exit, num_speculations=num_speculations, draft_threshold=draft_threshold,
        )  # fmt: skip
        limits = Limits(net.config.max_seq_len, net.config.vocab_size, max_new_tokens)
        name = Path(ckpt_path).stem if ckpt_path else Path(str(datamodule.tokenizer_source)).name
        spec = OpenAISpec(datamodule.tokenizer, limits, defaults, name, max_queue,
                          chat_template_of(datamodule.tokenizer_source))  # fmt: skip
        api = EngineAPI(net.eval(), spec, slots, engine, api_key or os.environ.get("LEGO_API_KEY") or None)
        server = build_server(api, accelerator, devices, max_body_bytes)
        print(f"lego serve: http://{host}:{port}/v1 (model {name!r}, {slots} slots)", flush=True)
        run_server(server, spec, host, port, grace_period)

    # ------------------------------------------------------------------------------ report
    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.global_step == 0:
            rank_zero_info("\nNothing was trained (0 optimizer steps), so there is no result to report.")
        elif callable(getattr(self.model, "summary_table", None)) and trainer.state.status.value == "finished":
            # A final evaluation of the fitted model (best weights restored), reported as a table.
            # The trainer's own callbacks only: the module's would be attached a second time.
            trainer.callbacks = self._trainer_callbacks
            (metrics,) = trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            rank_zero_info("\n" + self.model.summary_table(metrics))
        ckpt = trainer.checkpoint_callback
        if ckpt is None:
            checkpoints = "checkpoints: none (trainer.enable_checkpointing is false)"
        else:
            best = getattr(ckpt, "best_model_path", "") or "(none saved)"
            last = getattr(ckpt, "last_model_path", "") or "(none saved)"
            checkpoints = f"best checkpoint: {best}\nlast checkpoint: {last}"
        logs = (
            f"TensorBoard logs: {trainer.log_dir}\n  view with: tensorboard --logdir "
            f"{getattr(trainer.logger, 'save_dir', trainer.log_dir)}"
            if trainer.loggers
            else "logs: none (trainer.logger is false)"
        )
        rank_zero_info(f"\n{logs}\n{checkpoints}")


def repeated_prompts_as_one_list(raw: list[str]) -> list[str]:
    """``--prompt A --prompt B`` as the one list ``--prompt '["A", "B"]'`` that the parser reads (it keeps the last)."""
    texts, rest = [], []
    arguments = iter(raw)
    for arg in arguments:
        if arg == "--prompt":
            texts.append(next(arguments, ""))
        elif arg.startswith("--prompt="):
            texts.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    # Not ASCII-escaped: the parser reads the list as YAML, which refuses the surrogate pairs of an emoji's escape.
    return [*rest, "--prompt", json.dumps(texts, ensure_ascii=False)] if texts else rest


def user_error_message(error: BaseException) -> str | None:
    """The message of the error a user should read, or ``None`` when ``error`` is a bug (keep the traceback).

    jsonargparse wraps an error raised while it builds a class in errors of its own that end
    in a dump of the whole namespace; the error that was raised first is the one that says
    what is wrong.
    """
    cause: BaseException | None = error
    while cause is not None and _raised_in_jsonargparse(cause) and cause.__cause__ is not None:
        cause = cause.__cause__
    if not isinstance(cause, USER_ERRORS):
        return None
    return str(cause) or type(cause).__name__


def _raised_in_jsonargparse(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}jsonargparse{os.sep}" in tb.tb_frame.f_code.co_filename


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lego`` console script; ``args`` replaces ``sys.argv[1:]`` (for tests).

    An error caused by bad input prints its message (once, from rank 0) and exits with
    status 2; with ``LEGO_DEBUG=1`` it is raised with its traceback instead.
    """
    try:
        with warnings.catch_warnings():
            for message in QUIET:
                warnings.filterwarnings("ignore", message=message)
            # Lightning's CLI calls jsonargparse functions that jsonargparse has deprecated.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\.pytorch\.cli")
            LegoCLI(args=args)
    except Exception as error:
        message = user_error_message(error)
        if message is None or debug_mode():
            raise
        if rank_zero_only.rank == 0:
            print(f"lego: error: {message}", file=sys.stderr)
            print("  (set LEGO_DEBUG=1 to see where it was raised)", file=sys.stderr)
        sys.exit(2)
    finally:
        # Lightning leaves the process group up; gloo's threads then abort the process at exit.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
