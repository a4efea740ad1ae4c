"""Model Stock (Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024): per
layer, the mean θ̄ of the K fine-tunes pulled towards the pretrained model θ_0 by a ratio t read off the
angle between their task vectors. No held-out data, one pass over the models. Not a method of the MEHL paper.

Per layer (here: per state-dict tensor), with τ_i = θ_i − θ_0 and cos the mean cosine between τ_i and τ_j over
the K(K − 1) ordered pairs i ≠ j::

    t = K·cos / (1 + (K − 1)·cos),        θ = t·θ̄ + (1 − t)·θ_0

Streamed: with u_i = τ_i / ‖τ_i‖, Σ_{i≠j} cos(τ_i, τ_j) = ‖Σ_i u_i‖² − Σ_i ‖u_i‖², so one pass accumulating Σ u_i
and Σ θ_i suffices. Resident: θ_0, the two sums and the fine-tune being read (four models), whatever K is.

Edge cases (each layer on its own):

* ‖τ_i‖ = 0 (fine-tune i left the layer exactly at θ_0): its cosine with every other τ_j counts as 0, the
  convention of ``torch.nn.functional.cosine_similarity``; such a u_i is 0 and adds nothing to Σ u_i, and the
  mean is still over all K(K − 1) pairs. A layer no fine-tune changed has cos = 0, t = 0 and θ = θ_0 = θ̄.
* t is clipped to [0, 1]. The formula is increasing in cos and gives t = 1 at cos = 1 (so t ≤ 1 up to
  rounding); below cos = 0 it turns negative, and it diverges at the smallest possible mean cosine,
  cos = −1/(K − 1) (Σ u_i = 0: the task vectors cancel). A negative t would put the soup on the far side of
  θ_0 from the fine-tunes, outside the paper's picture (θ on the segment from θ_0 to θ̄, t a ratio of two
  distances), so any cos ≤ 0 gives t = 0: the layer stays at θ_0. ``stats["clipped"]`` lists those layers
  (a value above 1 can only be rounding, at cos ≈ 1, and is not listed).
* K = 1: there are no pairs; cos is taken as 1 (a task vector is aligned with itself), so t = 1 and θ = θ_1.
* Non-floating tensors (integer buffers such as BatchNorm's ``num_batches_tracked``) are copied from the FIRST
  fine-tune, as the uniform soup (``CheckpointPool.center``) does, so that t = 1 everywhere gives exactly it.

Sums and norms are taken in float32 at least (float64 stays float64); the soup has the fine-tunes' dtype.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from soupkit.methods.result import SoupResult

__all__ = ["stock_ratio", "model_stock_state", "model_stock"]

StateDict = dict[str, Tensor]


def stock_ratio(cos: float, k: int) -> float:
    """Model Stock's t = K·cos / (1 + (K − 1)·cos) for a mean pairwise cosine ``cos`` of K task vectors, in [0, 1]:
    0 for cos ≤ 0 (including the degenerate cos = −1/(K − 1)), at most 1; 1 for K = 1 (see the module docstring)."""
    if k < 1:
        raise ValueError(f"Model Stock needs K >= 1 fine-tunes, got {k}")
    if k == 1:
        return 1.0
    if not cos > 0.0:  # also a NaN cos: keep θ_0
        return 0.0
    return min(1.0, k * cos / (1.0 + (k - 1) * cos))


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def model_stock_state(pretrained: Mapping[str, Tensor], finetunes: Iterable[Mapping[str, Tensor]],
                      progress: bool = False, total: int | None = None) -> tuple[StateDict, dict, dict, int]:
    """Model Stock of the fine-tunes ``finetunes`` (read once, in order) about ``pretrained`` (θ_0).

    Neither input is modified. Returns ``(soup, t, cos, K)``: the soup's state dict, and per floating tensor
    ``{key: t}`` and ``{key: mean pairwise cosine}`` (float).
    """
    sums: StateDict = {}  # Σ θ_i
    units: StateDict = {}  # Σ τ_i / ‖τ_i‖ (only τ_i ≠ 0)
    squares: dict[str, float] = {}  # Σ ‖u_i‖² (1 per τ_i ≠ 0, up to rounding; summed as computed, so that a
    # layer only one fine-tune moved gets a cosine sum of exactly 0)
    dtypes: dict[str, torch.dtype] = {}
    fixed: StateDict = {}  # non-floating tensors, from the first fine-tune
    k = 0
    bar = tqdm(total=total, desc="model stock", disable=not progress)
    for state in finetunes:  # not through tqdm's iterator, which would keep the last model alive during the next read
        k += 1
        for key, value in state.items():
            if not value.is_floating_point():
                if k == 1:
                    fixed[key] = value.clone()
                continue
            wide = _wide(value.dtype)
            theta = value.to(wide)
            tau = theta - pretrained[key].to(device=theta.device, dtype=wide)
            norm = torch.linalg.vector_norm(tau)
            if k == 1:
                dtypes[key] = value.dtype
                sums[key] = theta.clone() if theta is value else theta  # never the caller's own tensor
                units[key] = torch.zeros_like(tau)
                squares[key] = 0.0
            else:
                sums[key].add_(theta)
            if norm.item() > 0.0:
                unit = tau.div_(norm)
                units[key].add_(unit)
                squares[key] += torch.linalg.vector_norm(unit, dtype=torch.float64).item() ** 2
            del theta, tau
        del state  # before the next model is read: one fine-tune resident
        bar.update()
    bar.close()
    if k == 0:
        raise ValueError("Model Stock needs at least one fine-tune")
    soup: StateDict = {}
    ts: dict[str, float] = {}
    coss: dict[str, float] = {}
    for key in pretrained:
        if key in fixed:
            soup[key] = fixed[key]
            continue
        if k == 1:
            cos = 1.0
        else:
            squared = torch.linalg.vector_norm(units.pop(key), dtype=torch.float64).item() ** 2
            cos = (squared - squares[key]) / (k * (k - 1))  # Σ_{i≠j} u_i·u_j over the K(K − 1) ordered pairs
        t = stock_ratio(cos, k)
        mean = sums.pop(key).div_(k)
        base = pretrained[key].to(device=mean.device, dtype=mean.dtype)
        soup[key] = mean.mul_(t).add_(base, alpha=1.0 - t).to(dtypes[key])  # t = 1: θ̄, t = 0: θ_0, exactly
        ts[key], coss[key] = t, cos
    return soup, ts, coss, k


def model_stock(model, pool, loader, cfg) -> SoupResult:
    """Model Stock over the pool about its pretrained model (``CheckpointPool(..., pretrained=...)``).

    No held-out data. ``coefficients`` is ``[K, L]``: t_l / K on each fine-tune for each of the L floating
    tensors (``layer_names``); the remaining 1 − t_l of each layer is θ_0's. ``stats``: ``t`` and ``cos`` per
    layer, their summary (``t_mean``, ``t_min``, ``t_max``) and the ``clipped`` layers (cos ≤ 0, t = 0).
    ``max_resident_models`` counts fine-tunes only: θ_0 and the two running sums are resident beside the one
    being read.

    Raises:
        MissingPretrainedError: the pool has no pretrained model.
    """
    device, dtype = cfg.systems.device, cfg.systems.dtype
    theta0 = pool.load_pretrained(device, dtype)  # first: a pool without θ_0 fails before any model is read
    k = len(pool)
    soup, ts, coss, _ = model_stock_state(theta0, (pool.load(i, device, dtype) for i in range(k)),
                                          progress=cfg.run.progress, total=k)
    names = list(ts)
    t = torch.tensor([ts[n] for n in names], dtype=torch.float32)
    clipped = [n for n in names if k > 1 and not coss[n] > 0.0]  # t clipped to 0: the layer is θ_0's
    stats = {"epochs": 0, "t": ts, "cos": coss, "clipped": clipped, "num_layers": len(names),
             "t_mean": float(t.mean()) if names else None, "t_min": float(t.min()) if names else None,
             "t_max": float(t.max()) if names else None}
    return SoupResult("model_stock", soup, (t / k).expand(k, -1).clone(), names, stats=stats)
