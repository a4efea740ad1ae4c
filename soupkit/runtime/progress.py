"""One line on stderr per finished run, for long notebook cells and the runner's console.

Off unless ``SOUPKIT_PROGRESS`` is set (to anything but ``""``/``0``/``false``); a notebook's parameter check
(:func:`soupkit.experiments.params.check_notebook`) sets it, so a notebook shows ``[soupkit] mehl+: ok ...`` under its long
cells instead of a bare ``[*]``. stderr because nbval never sees it there: every cell that runs soups is
``# NBVAL_IGNORE_OUTPUT`` (``tests/test_params.py`` checks that), and the runner forwards the kernels' stderr
to its console with each notebook's name. The variable travels to worker processes (notebook 10's seeds).
"""
from __future__ import annotations

import os
import sys

__all__ = ["ENV", "enabled", "enable", "report"]

ENV = "SOUPKIT_PROGRESS"


def enabled() -> bool:
    """Whether :func:`report` writes (``SOUPKIT_PROGRESS`` set and not ``0``/``false``)."""
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def enable() -> None:
    """Turn the lines on for this process and its children, unless the environment already says otherwise."""
    os.environ.setdefault(ENV, "1")


def report(line: str) -> None:
    """Write ``[soupkit] <line>`` to stderr (flushed at once, so it shows while the cell runs) when enabled."""
    if enabled():
        print(f"[soupkit] {line}", file=sys.stderr, flush=True)
