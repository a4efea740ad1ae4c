"""BatchNorm statistics of a soup: keep the souped running statistics, or re-estimate them on data.

Every soup method mixes the floating buffers (``running_mean``, ``running_var``) with the coefficients of
their layer (``soupkit.engine.layers``), so a soup of BatchNorm models always has statistics. They are an average
of the members' statistics, not the statistics of the averaged network: the features of a soup are not the
average of its members' features. Re-estimating them (a forward pass in train mode over some images, no
gradient) gives the soup its own statistics; :func:`bn_comparison` measures whether that matters.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from soupkit.engine.evaluation import predict
from soupkit.experiments.stats import bootstrap_accuracy, paired_difference
from soupkit.methods.result import SoupResult, evaluate
from soupkit.zoo.base import BaseZoo

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


def bn_comparison(zoo: BaseZoo, results_dir: str | Path, methods: Sequence[str], n: int | None = 1000,
                  split: str = "finetune", device: str | torch.device = "cpu") -> pd.DataFrame:
    """Test and held-out accuracy of each saved soup with its souped BatchNorm statistics and with statistics
    re-estimated on ``n`` images of ``split`` (a class-balanced prefix; ``finetune`` uses no held-out image).

    Args:
        results_dir: the ``out_dir`` of ``soupkit.experiments.run.run_methods`` (``<method>/`` subfolders);
            methods without a saved soup (the ensemble, runs that did not fit) are skipped.
    Returns:
        one row per method: ``method``, ``test souped (%)``, ``test re-estimated (%)``, ``held-out souped (%)``,
        ``held-out re-estimated (%)``, ``test change (points)``; and the 95 % intervals over test images:
        ``test souped low (%)`` / ``test souped high (%)``, ``test re-estimated low (%)`` /
        ``test re-estimated high (%)`` (percentile bootstrap of the per-image correctness,
        :func:`soupkit.experiments.stats.bootstrap_accuracy`) and ``test change low (points)`` / ``test change high
        (points)`` (paired bootstrap over the same images, :func:`soupkit.experiments.stats.paired_difference`: an interval
        containing 0 means re-estimating made no difference this test set can resolve).
    """
    model = zoo.make_model()
    x, _ = zoo.tensors(split, n)
    made = zoo.loaders()  # fixed order, 500 images per batch
    loaders = {"test": made["test"], "held-out": made["heldout"]}
    rows = []
    for method in methods:
        folder = Path(results_dir) / method.replace("+", "_plus")
        if not (folder / "result.json").is_file() or not (folder / "soup.safetensors").is_file():
            continue
        soup = SoupResult.load(folder).state_dict
        fresh = reestimate_bn(model, soup, x, device=device)
        row = {"method": method}
        correct = {}
        for label, state in (("souped", soup), ("re-estimated", fresh)):
            logits, labels = predict(model, state, loaders["test"], device)
            correct[label] = (logits.argmax(dim=1) == labels).numpy()
            row[f"test {label} (%)"] = 100 * float(correct[label].mean())
        for label, state in (("souped", soup), ("re-estimated", fresh)):
            row[f"held-out {label} (%)"] = 100 * evaluate(model, state, loaders["held-out"], device)
        row["test change (points)"] = row["test re-estimated (%)"] - row["test souped (%)"]
        for label in ("souped", "re-estimated"):
            interval = bootstrap_accuracy(correct[label]).scaled(100)
            row[f"test {label} low (%)"], row[f"test {label} high (%)"] = interval.low, interval.high
        change = paired_difference(correct["re-estimated"], correct["souped"]).scaled(100)
        row["test change low (points)"], row["test change high (points)"] = change.low, change.high
        rows.append(row)
    return pd.DataFrame(rows)
