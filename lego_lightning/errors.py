"""The error raised for a bad argument of a callback that stands in for one of Lightning's."""

from __future__ import annotations

from lightning.pytorch.utilities.exceptions import MisconfigurationException


class ConfigurationError(MisconfigurationException, ValueError):
    """A bad argument: Lightning's ``MisconfigurationException`` (what its own callbacks raise, so code written
    against them still catches it) and a ``ValueError`` (what the rest of this library raises)."""
