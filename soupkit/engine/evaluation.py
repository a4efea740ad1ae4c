"""Logits and top-1 accuracy of a state dict, with ``torch.func.functional_call`` (a soup's or an ensemble's:
``soupkit.methods.result.evaluate``).

The module passed in only provides the architecture: its own weights are never used or modified.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

__all__ = ["predict", "accuracy", "eval_mode", "forward_state"]


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
    """Top-1 accuracy of ``logits [N, C]`` against ``labels [N]``: correct / N, exactly (the one accuracy of
    soupkit: soups, ensembles, the zoos' fine-tunes and their linear probe)."""
    if len(labels) == 0:
        raise ValueError("accuracy of no examples")
    # a count over N in double precision, not a float32 mean: 0.9 is stored as 0.9, not 0.8999999761581421
    return int((logits.argmax(dim=1) == labels).sum()) / len(labels)




