"""LightningModules."""

from lego_lightning.modules.supervised_exit import SupervisedExitLM

__all__ = ["SupervisedExitLM"]
