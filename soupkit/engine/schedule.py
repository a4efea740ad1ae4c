"""The one learning-rate schedule: linear warm-up, then cosine to 0 (or constant). Learned soups
(``soupkit.engine.loop``), the embedded zoos' fine-tunes (``soupkit.zoo.recipe``) and the paper-scale sweep
(``soupkit.zoo.sweep``) all step it; each decides only how many warm-up steps it takes."""
from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(step: int, total: int, warmup: int, constant: bool = False) -> float:
    """Multiplier of the base learning rate at step ``step`` of ``total``.

    ``(step + 1) / warmup`` for the first ``warmup`` steps; then ``1`` if ``constant``, else a cosine from 1 at
    step ``warmup`` to 0 at step ``total`` (held at 0 past it).
    """
    if step < warmup:
        return (step + 1) / warmup
    if constant:
        return 1.0
    span = max(1, total - warmup)
    # integers before the float product: the same bytes as the formula each caller used before
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
