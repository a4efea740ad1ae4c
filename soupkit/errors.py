"""soupkit's own exception and warning types: catch :class:`SoupkitError` to catch every input soupkit refuses.

Each also derives from the built-in type callers would otherwise expect (``ValueError``, ``RuntimeError``),
so ``except ValueError`` keeps working.
"""
from __future__ import annotations

__all__ = ["SoupkitError", "CheckpointError", "DataError", "DivergenceError", "ResumeError", "SharedBasinWarning"]


class SoupkitError(Exception):
    """Base of every error soupkit raises on purpose about its inputs or a run."""


class CheckpointError(SoupkitError, ValueError):
    """A checkpoint cannot be used: the message names the file (and the key, where one is at fault)."""


class DataError(SoupkitError, ValueError):
    """The held-out data cannot be used: empty, not ``(inputs, labels)`` pairs, or labels the head cannot score."""


class DivergenceError(SoupkitError, RuntimeError):
    """The loss, the gradient or the soup became NaN/Inf while learning coefficients; no soup was written."""


class ResumeError(SoupkitError, ValueError):
    """A run directory belongs to another run (configuration, pool or data) or is in use by another process."""


class SharedBasinWarning(UserWarning):
    """The pool's models do not look like fine-tunes of one pretrained model: a soup of them may collapse."""
