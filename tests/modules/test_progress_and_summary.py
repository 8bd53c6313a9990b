"""What a run prints: the progress bar's description (never a negative epoch total) and FLOPs in the model summary."""

import re

import pytest
from lightning.pytorch.callbacks import Callback, ModelSummary, RichModelSummary, RichProgressBar, TQDMProgressBar

from lego_lightning.callbacks.model_summary import CountedFlopsSummary, ExitModelSummary, ExitRichModelSummary
from lego_lightning.model import flops
from tests.helpers import quiet_trainer, synthetic, tiny_ashem, tiny_lm


class Descriptions(Callback):
    """The training bar's description at the end of every epoch (after the module's hooks set it)."""

    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, pl_module):
        bar = trainer.progress_bar_callback
        if isinstance(bar, RichProgressBar):
            self.seen.append(bar.progress._tasks[bar.train_progress_bar_id].description)
        else:
            self.seen.append(bar.train_progress_bar.desc)


@pytest.mark.parametrize("bar", [RichProgressBar, TQDMProgressBar])
def test_a_phased_run_shows_each_phases_epoch_and_limit(tmp_path, bar):
    descriptions = Descriptions()
    trainer = quiet_trainer(
        tmp_path, max_epochs=-1, enable_progress_bar=True, callbacks=[bar(), descriptions], limit_val_batches=1
    )
    trainer.fit(tiny_ashem(phase1_max_epochs=2, phase2_max_epochs=2), synthetic())
    expected = [
        "Epoch 0 · phase 1/2, epoch 1/2",
        "Epoch 1 · phase 1/2, epoch 2/2",
        "Epoch 2 · phase 2/2, epoch 1/2",
        "Epoch 3 · phase 2/2, epoch 2/2",
    ]
    assert [d.split("]")[-1].rstrip(": ") for d in descriptions.seen] == expected


class RichFrames(Callback):
    """Every description the Rich bar is given, from its first task on (listed after the bar, which makes its
    progress display in on_train_start)."""

    def __init__(self):
        self.seen = []

    def on_train_start(self, trainer, pl_module):
        if not isinstance(trainer.progress_bar_callback, RichProgressBar):
            return
        progress = trainer.progress_bar_callback.progress
        for name in ("add_task", "reset", "update"):
            method = getattr(progress, name)

            def spy(*args, _method=method, _name=name, **kwargs):
                description = args[0] if _name == "add_task" and args else kwargs.get("description")
                if description is not None:
                    self.seen.append(str(description))
                return _method(*args, **kwargs)

            setattr(progress, name, spy)


@pytest.mark.parametrize("bar", [RichProgressBar, TQDMProgressBar])
def test_every_frame_of_a_phased_run_shows_its_phase_from_the_first(tmp_path, bar, capsys):
    frames = RichFrames()
    trainer = quiet_trainer(tmp_path, max_epochs=-1, enable_progress_bar=True, callbacks=[bar(), frames],
                            limit_val_batches=1)  # fmt: skip
    trainer.fit(tiny_ashem(phase1_max_epochs=1, phase2_max_epochs=2), synthetic())
    if bar is RichProgressBar:
        seen = frames.seen
    else:  # each frame tqdm draws, from the output
        seen = [f for f in capsys.readouterr().out.replace("\n", "\r").split("\r") if f.strip()]
    epochs = [f for f in seen if "Epoch" in f]
    assert len(epochs) >= 3 and not any("/-" in f for f in seen)
    assert all("phase" in f for f in epochs), epochs
    for epoch, phase in ((0, "phase 1/2, epoch 1/1"), (1, "phase 2/2, epoch 1/2"), (2, "phase 2/2, epoch 2/2")):
        first = next(f for f in epochs if f"Epoch {epoch} " in f)
        assert re.sub(r"^\[[^\]]*\]", "", first).lstrip().startswith(f"Epoch {epoch} · {phase}"), first


def test_a_run_without_an_epoch_limit_shows_no_negative_total(tmp_path):
    descriptions = Descriptions()
    bar = RichProgressBar()
    trainer = quiet_trainer(
        tmp_path, max_epochs=-1, max_steps=8, enable_progress_bar=True, callbacks=[bar, descriptions]
    )
    trainer.fit(tiny_lm(max_seq_len=16), synthetic())
    assert [d.split("]")[-1].strip() for d in descriptions.seen] == ["Epoch 0", "Epoch 1"]  # 4 steps an epoch
    assert RichProgressBar._get_train_description(bar, 0).startswith("Epoch 0/-2")  # what Lightning's own reads


@pytest.mark.parametrize(
    ("given", "ours"), [(RichModelSummary(), ExitRichModelSummary), (ModelSummary(2), ExitModelSummary)]
)
def test_the_model_summary_shows_flops_counted_per_token(tmp_path, given, ours):
    trainer = quiet_trainer(tmp_path, max_steps=1, enable_model_summary=True, callbacks=[given], limit_val_batches=0)
    module = tiny_lm(max_seq_len=16)
    trainer.fit(module, synthetic())
    summaries = [c for c in trainer.callbacks if isinstance(c, ModelSummary)]
    assert [type(c) for c in summaries] == [ours] and summaries[0]._max_depth == given._max_depth
    summary = summaries[0]._summary(trainer, module)
    assert isinstance(summary, CountedFlopsSummary)
    columns = dict(summary._get_summary_data())
    row = dict(zip(columns["Name"], columns["FLOPs"]))
    context = flops.mean_context(16)
    assert summary.total_flops == int(flops.full_flops(module.config, context).total) > 0
    assert row["model"] != "0"
    if given._max_depth == 2:
        assert summary.flop_counts["model.blocks"]["per token"] == int(
            3 * flops.layer_flops(module.config, context).total
        )


def test_no_summary_is_added_when_the_trainer_has_none(tmp_path):
    trainer = quiet_trainer(tmp_path, max_steps=1, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(tiny_lm(max_seq_len=16), synthetic())
    assert not [c for c in trainer.callbacks if isinstance(c, ModelSummary)]
