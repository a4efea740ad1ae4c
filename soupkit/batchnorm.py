"""BatchNorm statistics of a soup: keep the souped running statistics, or re-estimate them on data.

Every soup method mixes the floating buffers (``running_mean``, ``running_var``) with the coefficients of
their layer (``soupkit.layers``), so a soup of BatchNorm models always has statistics. They are an average
of the members' statistics, not the statistics of the averaged network: the features of a soup are not the
average of its members' features. Re-estimating them (a forward pass in train mode over some images, no
gradient) gives the soup its own statistics; :func:`bn_comparison` measures whether that matters.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data import make_loader
from .evaluation import evaluate
from .soup_result import SoupResult

if TYPE_CHECKING:  # pragma: no cover
    from .zoo import Zoo

__all__ = ["batchnorm_layers", "reestimate_bn", "bn_comparison"]


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules of ``model`` (empty for a ViT)."""
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def reestimate_bn(model: nn.Module, state: Mapping[str, Tensor], x: Tensor, batch_size: int = 250,
                  device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """``state`` with every BatchNorm's running mean and variance recomputed on images ``x`` [N, C, H, W].

    The statistics are the exact average over the batches (``momentum=None``), so the result depends only
    on ``x`` and ``batch_size``, not on the statistics in ``state``. ``model`` gives the architecture only:
    neither it nor ``state`` is modified.

    Returns:
        a new state dict (same keys, on CPU); only BatchNorm buffers differ from ``state``.
    """
    net = copy.deepcopy(model).to(device)
    net.load_state_dict(dict(state))
    net.eval()  # everything but BatchNorm in inference mode
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
    for i in range(0, len(x), batch_size):
        net(x[i:i + batch_size].to(device))
    new = net.state_dict()
    return {k: new[k].detach().to("cpu").clone() for k in state}


def _loader(x: Tensor, y: Tensor) -> Iterable:
    return make_loader(x, y, 500, shuffle=False)


def bn_comparison(zoo: "Zoo", results_dir: str | Path, methods: Sequence[str], n: int | None = 1000,
                  split: str = "finetune", device: str | torch.device = "cpu") -> pd.DataFrame:
    """Test and held-out accuracy of each saved soup with its souped BatchNorm statistics and with statistics
    re-estimated on ``n`` images of ``split`` (a class-balanced prefix; ``finetune`` uses no held-out image).

    Args:
        results_dir: the ``out_dir`` of ``soupkit.experiment.run_methods`` (``<method>/`` subfolders);
            methods without a saved soup (the ensemble, runs that did not fit) are skipped.
    Returns:
        one row per method: ``method``, ``test souped (%)``, ``test re-estimated (%)``, ``held-out souped (%)``,
        ``held-out re-estimated (%)``, ``test change (points)``.
    """
    model = zoo.make_model()
    x, _ = zoo.tensors(split, n)
    if hasattr(zoo, "loaders"):  # a zoo made elsewhere: real data sets, read in batches
        made = zoo.loaders()
        loaders = {"test": made["test"], "held-out": made["heldout"]}
    else:
        loaders = {"test": _loader(*zoo.tensors("test")), "held-out": _loader(*zoo.tensors("heldout"))}
    rows = []
    for method in methods:
        folder = Path(results_dir) / method.replace("+", "_plus")
        if not (folder / "result.json").is_file() or not (folder / "soup.safetensors").is_file():
            continue
        soup = SoupResult.load(folder).state_dict
        fresh = reestimate_bn(model, soup, x, device=device)
        row = {"method": method}
        for name, loader in loaders.items():
            row[f"{name} souped (%)"] = 100 * evaluate(model, soup, loader, device)
            row[f"{name} re-estimated (%)"] = 100 * evaluate(model, fresh, loader, device)
        row["test change (points)"] = row["test re-estimated (%)"] - row["test souped (%)"]
        rows.append(row)
    return pd.DataFrame(rows)
