"""User-facing errors of the torch-side stages (data, model).

Defined here rather than in ``fedllm.data`` / ``fedllm.model`` (which re-export them) so the
CLI can catch them without importing torch, transformers and peft: ``fedllm status``,
``privacy``, ``audit`` and ``report`` start in well under a second instead of several.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names the file and the line/column."""


class ModelError(ValueError):
    """The model directory or its settings cannot be used."""
