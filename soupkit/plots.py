"""Figures drawn from result files (never from in-memory state only), saved atomically as PNG."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves
import pandas as pd

from .results import DISPLAY

__all__ = ["save_figure", "plot_main_table", "plot_zoo_accuracies"]

_LEARNED = {"learned", "learned+", "hl", "hl+", "mehl", "mehl+"}


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Save ``fig`` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    os.replace(tmp, path)
    return path


def _colours(methods: pd.Series) -> list[str]:
    return ["tab:red" if m.startswith("mehl") else "tab:blue" if m in _LEARNED else "tab:gray" for m in methods]


def plot_main_table(table: pd.DataFrame, title: str) -> plt.Figure:
    """Three panels from :func:`soupkit.results.main_table`: test accuracy, construction time, peak memory.

    Methods with no construction (best, uniform, ensemble) appear in the accuracy panel only.
    """
    names = table["method"].map(DISPLAY)
    colours = _colours(table["method"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    acc = table["test acc (%)"]
    axes[0].barh(names, acc, color=colours)
    low = acc.min()
    axes[0].set_xlim(max(0.0, low - 2 * (acc.max() - low + 0.5)), min(100.0, acc.max() + 0.5))
    axes[0].set_xlabel("test accuracy (%)")
    # one row per method in every panel (NaN draws no bar), so the rows line up with the labels
    axes[1].barh(names, table["construction (s)"], color=colours)
    axes[1].set_xlabel("soup construction time (s)")
    axes[2].barh(names, table["peak memory (MB)"], color=colours)
    axes[2].set_xlabel("measured peak memory (MB)")
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_zoo_accuracies(models: pd.DataFrame, uniform_test_accuracy: float, title: str,
                        probe_test_accuracy: float | None = None) -> plt.Figure:
    """Histogram of the fine-tunes' test accuracy (``experiment.zoo_table``, fractions) with the uniform soup
    and, for embedded zoos, the linear probe every fine-tune started from."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist(100 * models.test_acc, bins=16, color="tab:gray", label="individual fine-tunes")
    ax.axvline(100 * uniform_test_accuracy, color="tab:blue", label="uniform soup")
    if probe_test_accuracy is not None:
        ax.axvline(100 * probe_test_accuracy, color="tab:green", ls="--", label="linear probe")
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel("models")
    ax.set_title(title)
    ax.legend(loc="upper left")
    return fig
