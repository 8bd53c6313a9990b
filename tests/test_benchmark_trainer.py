"""The Trainer every benchmark builds: Lightning's own outputs off unless a benchmark asks for one."""

from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.loggers import CSVLogger

from benchmarks.common import quiet_trainer


def test_a_quiet_trainer_logs_checkpoints_summarises_and_draws_nothing():
    trainer = quiet_trainer(max_steps=3)
    assert trainer.logger is None
    assert trainer.max_steps == 3
    kinds = (ModelCheckpoint, ModelSummary, ProgressBar)
    assert not [c for c in trainer.callbacks if isinstance(c, kinds)]


def test_a_benchmark_may_turn_one_output_back_on(tmp_path):
    trainer = quiet_trainer(logger=CSVLogger(tmp_path), enable_progress_bar=True)
    assert isinstance(trainer.logger, CSVLogger)
    assert any(isinstance(c, ProgressBar) for c in trainer.callbacks)
    assert not any(isinstance(c, ModelCheckpoint) for c in trainer.callbacks)
