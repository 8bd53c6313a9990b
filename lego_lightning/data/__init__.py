"""Data modules: text corpora tokenized into arrays on disk, and a synthetic corpus."""

from lego_lightning.data.blocks import ResumableDataLoader, TokenBlocks, unpack_batch
from lego_lightning.data.synthetic import SyntheticDataModule
from lego_lightning.data.text import TextDataModule
from lego_lightning.data.tokenizer import TextTokenizer
from lego_lightning.data.vocab import Vocabulary

__all__ = [
    "ResumableDataLoader",
    "SyntheticDataModule",
    "TextDataModule",
    "TextTokenizer",
    "TokenBlocks",
    "Vocabulary",
    "unpack_batch",
]
