"""Checks of a soup's inputs that run before any long computation (see ``docs/checks.md``).

* :func:`finite_sq_norms`: NaN/Inf weights, done on each model the first time the pool reads it; the same
  pass gives the per-tensor squared norms that the basin check and the resume check reuse.
* :func:`check_heldout` / :func:`check_labels`: an empty held-out loader, batches that are not
  ``(inputs, labels)``, labels the model's head cannot score.
* :func:`check_shared_basin`: models that are not fine-tunes of one pretrained model.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .errors import CheckpointError, DataError, SharedBasinWarning
from .evaluation import eval_mode, forward_state

if TYPE_CHECKING:  # pragma: no cover
    from .pool import CheckpointPool

__all__ = ["finite_sq_norms", "check_labels", "check_heldout", "BasinReport", "basin_report",
           "check_shared_basin", "BASIN_THRESHOLD"]

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


# ---- held-out data ---------------------------------------------------------------------------------------
def check_labels(y: Tensor, logits_shape: Sequence[int], what: str = "held-out batch") -> None:
    """Raise DataError unless ``y`` (class indices ``[N]`` or probabilities ``[N, C]``) fits logits ``[N, C]``."""
    n, c = int(logits_shape[0]), int(logits_shape[-1])
    if y.is_floating_point() and tuple(y.shape) == (n, c):
        return  # class probabilities, as cross_entropy accepts them
    if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"{what}: labels must be class indices [N] (integers) or probabilities [N, {c}]; "
                        f"got a {y.dtype} tensor of shape {list(y.shape)} for logits of shape [{n}, {c}]")
    if len(y) != n:
        raise DataError(f"{what}: {len(y)} labels for {n} inputs")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())  # one sync on accelerators; the loss is read every step anyway
        if lo < 0 or hi >= c:
            raise DataError(f"{what}: labels must lie in [0, {c}) — the model's head has {c} outputs — but "
                            f"this batch has labels from {lo} to {hi}: a head for another label set?")


def _first_batch(loader: Iterable, what: str) -> tuple[Tensor, Tensor]:
    if isinstance(loader, Iterator):
        raise TypeError(f"the {what} must be re-iterable (a DataLoader or a list of batches), "
                        "not a one-shot iterator")
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not all(isinstance(t, Tensor) for t in batch[:2]):
            raise DataError(f"the {what} must yield (inputs, labels) tensor pairs; its first batch is a "
                            f"{type(batch).__name__}")
        return batch[0], batch[1]
    raise DataError(f"the {what} is empty: a soup method needs held-out examples")


@torch.no_grad()
def check_heldout(model: nn.Module, state: Mapping[str, Tensor], loader: Iterable,
                  device: str | torch.device = "cpu", what: str = "held-out loader") -> int:
    """Run the model with weights ``state`` on the loader's first batch; return the number of classes C.

    Raises:
        DataError: the loader is empty, its batches are not ``(inputs, labels)``, the model cannot run on the
            first batch, or its labels do not fit the output ``[N, C]`` (later batches: the training loss).
        TypeError: ``loader`` is a one-shot iterator.
    """
    x, y = _first_batch(loader, what)
    try:
        with eval_mode(model):
            logits = functional_call(model, forward_state(model, state), (x.to(device),))
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise DataError(f"the model cannot run on the {what}'s first batch (inputs {list(x.shape)}, "
                        f"{x.dtype}): {type(err).__name__}: {err}") from err
    if logits.dim() != 2:
        raise DataError(f"the model returns outputs of shape {list(logits.shape)}; a classifier's [N, C] is needed")
    check_labels(y, logits.shape, f"the {what}'s first batch")
    return int(logits.shape[-1])


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


def check_shared_basin(pool: "CheckpointPool", centre: Mapping[str, Tensor] | None = None, *,
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
