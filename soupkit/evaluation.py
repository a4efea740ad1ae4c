"""Top-1 accuracy of a soup, a state dict or an ensemble, with ``torch.func.functional_call``.

The module passed in only provides the architecture: its own weights are never used or modified.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

if TYPE_CHECKING:  # pragma: no cover
    from .methods import SoupResult

__all__ = ["evaluate", "soup_logits", "predict", "accuracy", "eval_mode", "forward_state"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block, the previous train/eval flags restored afterwards."""
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in zip(model.modules(), flags):
            m.training = flag


def forward_state(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries of ``state`` that ``functional_call`` should receive: one name per tied tensor."""
    names = dict.fromkeys(n for n, _ in model.named_parameters())
    names.update(dict.fromkeys(n for n, _ in model.named_buffers()))
    return {k: state[k] for k in names if k in state}


@torch.no_grad()
def predict(model: nn.Module, state: Mapping[str, Tensor], loader: Iterable, device: str | torch.device = "cpu",
            progress: bool = False, desc: str = "eval") -> tuple[Tensor, Tensor]:
    """Logits ``[N, C]`` and labels ``[N]`` of the model with weights ``state`` over ``loader``."""
    inputs = forward_state(model, state)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    logits, labels = [], []
    with eval_mode(model):
        for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
            logits.append(functional_call(model, inputs, (x.to(device),)).float().cpu())
            labels.append(y.cpu())
    if not logits:
        raise ValueError("the evaluation loader yielded no batches")
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``logits [N, C]`` against ``labels [N]``."""
    return (logits.argmax(dim=1) == labels).float().mean().item()


def soup_logits(model: nn.Module, soup: Union["SoupResult", Mapping[str, Tensor]], loader: Iterable,
                device: str | torch.device | None = None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Logits ``[N, C]`` and labels ``[N]`` over ``loader`` of a :class:`SoupResult` (the ensemble included: the
    weighted mean of its members' logits, one member read at a time) or of a state dict.

    For an ensemble ``loader`` must yield its batches in the same order on every pass (no shuffling).
    """
    from .methods import SoupResult  # noqa: PLC0415  (methods imports this module)

    if isinstance(soup, SoupResult):
        device = device or soup.stats.get("device", "cpu")
        if soup.state_dict is None:
            if soup.members is None:
                raise ValueError(f"{soup.name!r} has neither a state dict nor ensemble members")
            total, labels = None, None
            weights = soup.coefficients
            for i in range(len(soup.members)):
                state = soup.members.load(i, device)
                logits, y = predict(model, state, loader, device, progress, desc=f"member {i}")
                del state
                total = logits * weights[i] if total is None else total + logits * weights[i]
                if labels is not None and not torch.equal(labels, y):
                    raise ValueError("the loader changed its order between passes: use shuffle=False")
                labels = y
            return total, labels
        soup = soup.state_dict
    return predict(model, soup, loader, device or "cpu", progress)


def evaluate(model: nn.Module, soup: Union["SoupResult", Mapping[str, Tensor]], loader: Iterable,
             device: str | torch.device | None = None, progress: bool = False) -> float:
    """Top-1 accuracy on ``loader`` of a :class:`SoupResult` (the ensemble included) or a state dict."""
    return accuracy(*soup_logits(model, soup, loader, device, progress))
