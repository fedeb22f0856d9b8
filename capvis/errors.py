"""One exception family for everything a user can get wrong.

``capvis.cli.main`` catches :class:`CapvisError` and prints its message as one line, so every
error raised for bad input (a missing file, a malformed annotation, an unknown config key) must
name its culprit in the message itself.
"""

from __future__ import annotations


class CapvisError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in capvis."""


class ConfigError(CapvisError):
    """A config file or a ``key=value`` override is wrong (unknown key, bad type, impossible combination)."""


class DataError(CapvisError):
    """A dataset, annotation file, image or vocabulary cannot be used."""


class CheckpointError(CapvisError):
    """A checkpoint is missing, corrupt or does not match the model."""
