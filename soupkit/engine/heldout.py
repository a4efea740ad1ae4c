"""Checks of the held-out data that run before any long computation (see ``docs/checks.md``): an empty loader,
batches that are not ``(inputs, labels)``, labels the model's head cannot score."""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from soupkit.engine.evaluation import eval_mode, forward_state
from soupkit.errors import DataError

__all__ = ["check_labels", "check_heldout"]


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
