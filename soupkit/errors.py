"""soupkit's own exception and warning types: catch :class:`SoupkitError` to catch every input soupkit refuses.

Each also derives from the built-in type callers would otherwise expect (``ValueError``, ``RuntimeError``),
so ``except ValueError`` keeps working.
"""
from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["SoupkitError", "CheckpointError", "DataError", "DivergenceError", "ResumeError", "SharedBasinWarning",
           "DuplicateCheckpointWarning", "ParameterError", "MissingInputError", "CheckpointLayoutError",
           "ZooMismatchError", "DownloadError", "IntegrityError", "MemoryCapExceeded", "SweepError", "PlanError",
           "OptionError", "UnknownOptionError", "MissingPretrainedError",
           "WarmStartError", "GrowingError"]


class SoupkitError(Exception):
    """Base of every error soupkit raises on purpose about its inputs or a run."""


class CheckpointError(SoupkitError, ValueError):
    """A checkpoint cannot be used: the message names the file (and the key, where one is at fault)."""


class MissingPretrainedError(SoupkitError, ValueError):
    """A method needs the pretrained model θ_0 (Model Stock, task arithmetic) and the pool has none: build it
    with ``CheckpointPool(sources, pretrained=<file or state dict>)`` (a zoo gives its ``pretrained_path``)."""


class DataError(SoupkitError, ValueError):
    """The held-out data cannot be used: empty, not ``(inputs, labels)`` pairs, or labels the head cannot score."""


class DivergenceError(SoupkitError, RuntimeError):
    """The loss, the gradient or the soup became NaN/Inf while learning coefficients; no soup was written."""


class ResumeError(SoupkitError, ValueError):
    """A run directory belongs to another run (configuration, pool or data) or is in use by another process."""


class WarmStartError(SoupkitError, ValueError):
    """A previous result cannot be grown with ``warm_start``: it is not a finished HL/MEHL result, or the pool does
    not begin with its models (same files, same order), or its layers differ: the message says which."""


class SharedBasinWarning(UserWarning):
    """The pool's models do not look like fine-tunes of one pretrained model: a soup of them may collapse."""


class DuplicateCheckpointWarning(UserWarning):
    """Two checkpoints of the pool hold the same weights, or nearly: a soup counts that model twice (the message
    names the files; ``soupkit.pool.diagnostics``)."""


class ParameterError(SoupkitError, ValueError):
    """A notebook parameter (or a command-line argument) has a value the notebook cannot use: the message names
    it, the values it accepts and the fix."""


class MissingInputError(SoupkitError, FileNotFoundError):
    """An input another notebook writes is not there: the message names the path and the notebook to run first."""


class CheckpointLayoutError(CheckpointError):
    """A state dict does not fit the classifier: the message names the source and lists the keys at fault."""


class ZooMismatchError(SoupkitError, RuntimeError):
    """The zoo on disk was built with another recipe or split file."""


class DownloadError(SoupkitError, RuntimeError):
    """A file could not be downloaded: the message names the file and the URL."""


class IntegrityError(DownloadError):
    """A downloaded file has the wrong size or sha256: the message names the file."""


class SweepError(SoupkitError, RuntimeError):
    """The output folder belongs to another sweep or is inconsistent: the message names the file."""


class MemoryCapExceeded(SoupkitError, MemoryError):
    """A block of code needed more memory than its cap (the paper's ">256GB": the run did not fit)."""

    def __init__(self, cap_bytes: int, seen_bytes: int, source: str) -> None:
        super().__init__(f"needed more than the memory cap of {cap_bytes / 2**20:.1f} MB "
                         f"(at least {seen_bytes / 2**20:.1f} MB, {source})")
        self.cap_bytes, self.seen_bytes, self.source = cap_bytes, seen_bytes, source


class PlanError(SoupkitError, ValueError):
    """An argument the planner cannot use (unknown method, K < 1, a missing zoo, ...); the message says which."""


class OptionError(SoupkitError, ValueError):
    """An option of ``make_soup`` (a field of ``soupkit.config.SoupConfig``) has a value it cannot take, or the
    soup method is not registered: the message names the option and what it accepts."""


class UnknownOptionError(SoupkitError, TypeError):
    """``make_soup`` (or ``with_options``) got an option no group of ``SoupConfig`` has: the message lists the
    valid names. A TypeError, as for an unexpected keyword argument."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block), exit status 2: the command lines' bad arguments
    get a sentence, like every other input soupkit refuses."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class GrowingError(SoupkitError, ValueError):
    """A growing study (soupkit.experiments.growing) that cannot run as asked (sizes, method)."""
