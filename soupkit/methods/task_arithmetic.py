"""Task arithmetic with one scaling coefficient chosen on the held-out split (not a method of the MEHL paper)::

    θ(s) = θ_0 + s·(θ̄ − θ_0) = θ_0 + λ·Σ_i (θ_i − θ_0),    λ = s / K

θ_0 the pretrained model, θ̄ the mean of the K fine-tunes: s = 0 is θ_0, s = 1 the uniform soup, s > 1
extrapolates along the mean task vector (and s < 0 away from it). Equivalently: task arithmetic's single λ on
the SUM of the K task vectors τ_i = θ_i − θ_0, with λ = s/K. s is the value of the grid ``scale_grid``
(default 0.0, 0.1, ..., 2.0; ``soupkit.config.TASK_ARITHMETIC_GRID``) whose soup has the highest held-out
accuracy; among equal accuracies the SMALLEST s (the soup nearest θ_0 on the grid).

θ(s) is computed as (1 − s)·θ_0 + s·θ̄, which equals θ_0 at s = 0 and θ̄ (the uniform soup) at s = 1 exactly.
Non-floating tensors come from θ̄, i.e. from the first fine-tune (``CheckpointPool.center``). Resident: θ_0,
θ̄ and one candidate soup.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from soupkit.config import TASK_ARITHMETIC_GRID
from soupkit.engine.evaluation import accuracy, predict
from soupkit.methods.result import SoupResult

__all__ = ["scaled_soup", "choose_scale", "task_arithmetic"]

StateDict = dict[str, Tensor]


def scaled_soup(pretrained: Mapping[str, Tensor], mean: Mapping[str, Tensor], scale: float) -> StateDict:
    """θ(s) = (1 − s)·θ_0 + s·θ̄ for every floating tensor (= θ_0 + s·(θ̄ − θ_0)); others are θ̄'s (new tensors,
    the inputs are not modified). Exact at s = 0 (θ_0) and s = 1 (θ̄)."""
    return {k: torch.add(pretrained[k].to(device=v.device, dtype=v.dtype) * (1.0 - scale), v, alpha=scale)
            if v.is_floating_point() else v.clone() for k, v in mean.items()}


def choose_scale(accuracies: Sequence[float], grid: Sequence[float]) -> int:
    """Index of the highest accuracy; among equal accuracies, that of the smallest scale."""
    if len(accuracies) != len(grid) or not grid:
        raise ValueError(f"need one accuracy per scale, got {len(accuracies)} for {len(grid)}")
    return max(range(len(grid)), key=lambda i: (accuracies[i], -grid[i]))


def task_arithmetic(model, pool, loader, cfg) -> SoupResult:
    """The scaled soup θ_0 + s·(θ̄ − θ_0) with s chosen on the held-out ``loader`` from ``cfg.algorithm.scale_grid``.

    ``coefficients``: ``[K]``, s/K on each fine-tune (= λ); the remaining 1 − s is θ_0's. ``history`` and
    ``stats["heldout_accuracies"]``: the held-out accuracy of each scale, in grid order (``stats["scales"]``);
    ``stats["scale"]``, ``stats["lambda"]`` and ``stats["heldout_accuracy"]``: those of the chosen one.

    Raises:
        MissingPretrainedError: the pool has no pretrained model.
    """
    device, dtype = cfg.systems.device, cfg.systems.dtype
    grid = tuple(cfg.algorithm.scale_grid or TASK_ARITHMETIC_GRID)
    theta0 = pool.load_pretrained(device, dtype)  # first: a pool without θ_0 fails before any model is read
    mean = pool.center(device, dtype)
    accs: list[float] = []
    for s in tqdm(grid, desc="task arithmetic", disable=not cfg.run.progress):
        candidate = scaled_soup(theta0, mean, s)
        accs.append(accuracy(*predict(model, candidate, loader, device)))
        del candidate  # before the next: one candidate resident
    best = choose_scale(accs, grid)
    s, k = grid[best], len(pool)
    return SoupResult("task_arithmetic", scaled_soup(theta0, mean, s), torch.full((k,), s / k), history=accs,
                      stats={"epochs": len(grid), "scales": list(grid), "heldout_accuracies": accs, "scale": s,
                             "lambda": s / k, "heldout_accuracy": accs[best]})
