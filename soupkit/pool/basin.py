"""Checks of a pool's weights that run before any long computation (see ``docs/checks.md``; the held-out data's
are ``soupkit.engine.heldout``).

* :func:`finite_sq_norms`: NaN/Inf weights, done on each model the first time the pool reads it; the same
  pass gives the per-tensor squared norms that the basin check and the resume check reuse.
* :func:`check_shared_basin`: models that are not fine-tunes of one pretrained model;
  :func:`cosines_to_rest`: the same measure for each model against the mean of the others, to name the
  models outside the basin (``soupkit.pool.diagnostics``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import torch
from torch import Tensor

from soupkit.errors import CheckpointError, SharedBasinWarning

__all__ = ["finite_sq_norms", "BasinReport", "basin_report", "NormedPool", "check_shared_basin", "cosines_to_rest",
           "BASIN_THRESHOLD"]

# fine-tunes of one pretrained model have per-tensor cosines ~0.9-1; independently trained ones ~0 (plus
# the constant-initialised norm weights): halfway between flags the second kind
BASIN_THRESHOLD = 0.5


# ---- NaN / Inf -------------------------------------------------------------------------------------------
def _norm(t: Tensor) -> Tensor:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()  # float8 types have no reductions: a copy of this one tensor
    # float32 accumulation (float64 for float64 tensors): 20x faster than a float64 cast on CPU
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t.reshape(-1), dtype=acc)


def finite_sq_norms(state: Mapping[str, Tensor], name: str, check: bool = True) -> dict[str, float]:
    """``{key: ‖t‖²}`` of the floating tensors of ``state``; with ``check``, NaN/Inf values raise.

    One reduction per tensor and one device sync per model: a non-finite value makes the norm non-finite,
    so the finiteness check costs nothing beyond the norms.

    Raises:
        CheckpointError: naming ``name`` and the first key holding NaN or Inf.
    """
    keys = [k for k, t in state.items() if t.is_floating_point() and t.numel()]
    if not keys:
        return {}
    norms = torch.stack([_norm(state[k]) for k in keys])
    out = dict(zip(keys, norms.pow(2).tolist()))
    if check:
        for key in keys:
            if out[key] != float("inf") and out[key] == out[key]:
                continue
            t = state[key] if state[key].dtype.itemsize > 1 else state[key].float()
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if n_nan or n_inf:  # otherwise finite values whose squares overflow: huge, but not broken
                raise CheckpointError(f"{name}: key {key!r} holds {n_nan} NaN and {n_inf} Inf values (of "
                                      f"{t.numel()}, as {state[key].dtype}): a diverged fine-tune or a lossy cast? "
                                      "(CheckpointPool(..., check_finite=False) skips this check)")
    return out








# ---- shared basin ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BasinReport:
    """How alike the K models are.

    Attributes:
        mean_cosine: mean over pairs i ≠ j of cos(θ_i, θ_j), per tensor, averaged with tensor sizes as
            weights; None for K < 2.
        per_key: the per-tensor value.
        shared: ``mean_cosine >= threshold`` (True for K < 2).
    """

    mean_cosine: float | None
    threshold: float
    per_key: dict[str, float] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        return self.mean_cosine is None or self.mean_cosine >= self.threshold


def basin_report(sq_norms: Sequence[Mapping[str, float]], centre_sq: Mapping[str, float],
                 numel: Mapping[str, int], threshold: float = BASIN_THRESHOLD) -> BasinReport:
    """Mean pairwise cosine of K models from their squared norms and their mean's, per tensor.

    With S = Σ_i ‖θ_i‖² and ‖θ̄‖² of the mean: Σ_{i≠j} ⟨θ_i, θ_j⟩ = K²‖θ̄‖² − S, so the mean pairwise inner
    product over the mean squared norm is (K²‖θ̄‖² − S) / ((K − 1) S): exact when the norms are equal, and
    it needs no pair of models in memory. (Cosines of the centred θ_i − θ̄ would not do: they average
    −1/(K−1) for any pool.)

    >>> basin_report([{"w": 1.0}, {"w": 1.0}], {"w": 1.0}, {"w": 4}).mean_cosine  # two equal models
    1.0
    """
    k = len(sq_norms)
    if k < 2:
        return BasinReport(None, threshold)
    per_key = {}
    for key, c in centre_sq.items():
        s = sum(n.get(key, 0.0) for n in sq_norms)
        if s > 0 and s != float("inf"):
            per_key[key] = (k * k * c - s) / ((k - 1) * s)
    weight = sum(numel[key] for key in per_key)
    mean = sum(numel[key] * v for key, v in per_key.items()) / weight if weight else None
    return BasinReport(mean, threshold, per_key)


class NormedPool(Protocol):
    """What the basin check reads of a pool (``soupkit.pool.checkpoint_pool.CheckpointPool`` has it)."""

    def __len__(self) -> int: ...

    def center(self) -> dict[str, Tensor]: ...

    def model_sq_norms(self, i: int) -> dict[str, float]: ...


def check_shared_basin(pool: NormedPool, centre: Mapping[str, Tensor] | None = None, *,
                       threshold: float = BASIN_THRESHOLD, warn: bool = True) -> BasinReport:
    """Warn (:class:`SharedBasinWarning`) when the pool's models do not look like fine-tunes of one model.

    Cost: nothing beyond the pass that computes the centre θ̄ (give ``centre`` if you have it): the pool
    records each model's squared norms the first time it reads it.

    Args:
        pool: the K models.
        centre: their uniform average ``{key: Tensor[*shape]}``; computed (one streamed pass) if None.
        threshold: ``mean_cosine`` below it triggers the warning.
    """
    if len(pool) < 2:
        return BasinReport(None, threshold)
    if centre is None:
        centre = pool.center()
    norms = [pool.model_sq_norms(i) for i in range(len(pool))]
    floats = {k: v for k, v in centre.items() if v.is_floating_point() and k in norms[0]}
    centre_sq = finite_sq_norms(floats, "the centre", check=False)
    report = basin_report(norms, centre_sq, {k: v.numel() for k, v in floats.items()}, threshold)
    if warn and not report.shared:
        low = sorted(report.per_key, key=report.per_key.get)[:3]
        warnings.warn(SharedBasinWarning(
            f"the {len(pool)} models do not look like fine-tunes of one pretrained model: their mean pairwise "
            f"cosine similarity is {report.mean_cosine:.2f} (< {threshold}; fine-tunes of one model are "
            f"typically > 0.9, independently trained models ~0; lowest: "
            + ", ".join(f"{k} {report.per_key[k]:.2f}" for k in low)
            + "). Their soup may collapse to chance accuracy. make_soup(..., check_basin=False) silences this."),
            stacklevel=2)
    return report


def cosines_to_rest(sq_norms: Sequence[Mapping[str, float]], dots: Sequence[Mapping[str, float]],
                    centre_sq: Mapping[str, float], numel: Mapping[str, int]) -> list[float | None]:
    """Per model i, :func:`basin_report`'s cosine between θ_i and the mean of the other models θ̄₋ᵢ.

    One model outside the basin barely moves the pool's mean cosine when K is large; against the rest it scores
    ~0 while a fine-tune scores ~1, so the same ``threshold`` names it. From per-key sums only: with
    d = ⟨θ_i, θ̄⟩, n = ‖θ_i‖² and c = ‖θ̄‖², θ̄₋ᵢ = (Kθ̄ − θ_i)/(K − 1) gives ⟨θ_i, θ̄₋ᵢ⟩ = (Kd − n)/(K − 1) and
    ‖θ̄₋ᵢ‖² = (K²c − 2Kd + n)/(K − 1)²; the pair (θ_i, θ̄₋ᵢ) then goes through :func:`basin_report`.

    Args:
        sq_norms: ``[K]`` of ``{key: ‖θ_i[key]‖²}``.
        dots: ``[K]`` of ``{key: ⟨θ_i[key], θ̄[key]⟩}``.
        centre_sq: ``{key: ‖θ̄[key]‖²}``; numel: ``{key: elements}``.
    Returns:
        ``[K]`` cosines (None for K < 2).
    """
    k = len(sq_norms)
    if k < 2:
        return [None] * k
    out: list[float | None] = []
    for n_i, d_i in zip(sq_norms, dots):
        rest, cross, pair = {}, {}, {}
        for key, c in centre_sq.items():
            n, d = n_i.get(key, 0.0), d_i.get(key, 0.0)
            rest[key] = max((k * k * c - 2 * k * d + n) / (k - 1) ** 2, 0.0)  # rounding may dip below 0
            cross[key] = (k * d - n) / (k - 1)
            pair[key] = (n + rest[key] + 2 * cross[key]) / 4  # ‖(θ_i + θ̄₋ᵢ)/2‖²
        out.append(basin_report([n_i, rest], pair, numel).mean_cosine)
    return out
