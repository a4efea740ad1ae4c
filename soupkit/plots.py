"""Figures drawn from result files (never from in-memory state only), saved atomically as PNG."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves
from matplotlib.lines import Line2D
import numpy as np
import pandas as pd

from .results import DISPLAY
from .stats import wilson_interval

__all__ = ["save_figure", "plot_main_table", "plot_zoo_accuracies"]

_LEARNED = {"learned", "learned+", "hl", "hl+", "mehl", "mehl+", "mehl+released"}


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Save ``fig`` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    os.replace(tmp, path)
    return path


_FAMILIES = (("tab:red", "MEHL family"), ("tab:blue", "other learned soups"), ("tab:gray", "baselines"))


def _colours(methods: pd.Series) -> list[str]:
    return ["tab:red" if m.startswith("mehl") else "tab:blue" if m in _LEARNED else "tab:gray" for m in methods]


def _accuracy_limits(values: list[pd.Series]) -> tuple[float, float] | None:
    """x range (%) covering every finite value of ``values`` with a margin, inside [0, 100]."""
    finite = pd.concat(values).dropna()
    if finite.empty:
        return None
    low, high = float(finite.min()), float(finite.max())
    pad = max(0.1 * (high - low), 0.25)
    return max(0.0, low - pad), min(100.0, high + pad)


def plot_main_table(table: pd.DataFrame, title: str) -> plt.Figure:
    """Three panels from :func:`soupkit.results.main_table`: test accuracy, construction time, peak memory.

    The accuracy panel shows each method's test accuracy as a point with its 95 % interval over test images
    (``test low (%)`` / ``test high (%)``) as a horizontal error bar; its x range covers every interval.
    Methods with no interval (no predictions kept) are points only; runs that did not fit are labelled.
    Methods with no construction (best, uniform, ensemble) appear in the accuracy panel only.
    """
    names = [DISPLAY.get(m) or m for m in table["method"]]
    colours = _colours(table["method"])
    rows = np.arange(len(table))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    acc = pd.to_numeric(table["test acc (%)"], errors="coerce")
    nan = pd.Series(np.nan, index=table.index)
    low = pd.to_numeric(table.get("test low (%)", nan), errors="coerce")
    high = pd.to_numeric(table.get("test high (%)", nan), errors="coerce")
    for y, a, lo, hi, colour in zip(rows, acc, low, high, colours):
        if pd.isna(a):
            continue
        err = [[a - lo], [hi - a]] if pd.notna(lo) and pd.notna(hi) else None
        axes[0].errorbar([a], [y], xerr=err, fmt="o", color=colour, ecolor=colour, elinewidth=2, capsize=4, ms=6)
    limits = _accuracy_limits([acc, low, high])
    if limits is not None:
        axes[0].set_xlim(*limits)
        for y, a, note in zip(rows, acc, table.get("note", pd.Series("", index=table.index))):
            if pd.isna(a):
                axes[0].annotate(str(note) or "no accuracy", (limits[0], y), xytext=(4, 0),
                                 textcoords="offset points", va="center", fontsize=8, color="dimgray")
    axes[0].set_xlabel("test accuracy (%), 95 % interval over test images")
    handles = [Line2D([], [], color=c, marker="o", ls="-", lw=2, label=label) for c, label in _FAMILIES
               if c in colours]
    axes[0].legend(handles=handles, loc="best", fontsize=8)
    # one row per method in every panel (NaN draws no bar), so the rows line up with the labels
    axes[1].barh(rows, table["construction (s)"], color=colours)
    axes[1].set_xlabel("soup construction time (s)")
    axes[2].barh(rows, table["peak memory (MB)"], color=colours)
    axes[2].set_xlabel("measured peak memory (MB)")
    axes[0].set_yticks(rows, names)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)  # first method on top
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_zoo_accuracies(models: pd.DataFrame, uniform_test_accuracy: float, title: str,
                        probe_test_accuracy: float | None = None, test_size: int | None = None) -> plt.Figure:
    """Histogram of the fine-tunes' test accuracy (``experiment.zoo_table``, fractions) with the uniform soup
    and, for embedded zoos, the linear probe every fine-tune started from.

    ``test_size`` (the number of test images, e.g. the uniform record's ``test_images``) adds the 95 % Wilson
    interval of a binomial accuracy on that many images (:func:`soupkit.stats.wilson_interval`): a band around
    the uniform soup (and the probe), and in the legend the half-width for a fine-tune of the zoo's mean
    accuracy -- differences between models smaller than that are within test-set noise. None: no intervals.
    """
    fig, ax = plt.subplots(figsize=(7, 3.2))
    label = "individual fine-tunes"
    if test_size is not None and len(models):
        typical = wilson_interval(float(models.test_acc.mean()), test_size).scaled(100)
        label += f" (each ±{typical.half_width:.2f} pts, 95 %)"
    ax.hist(100 * models.test_acc, bins=16, color="tab:gray", label=label)
    marks = [(uniform_test_accuracy, "tab:blue", "-", "uniform soup")]
    if probe_test_accuracy is not None:
        marks.append((probe_test_accuracy, "tab:green", "--", "linear probe"))
    for accuracy, colour, style, name in marks:
        if test_size is not None:
            band = wilson_interval(float(accuracy), test_size).scaled(100)
            ax.axvspan(band.low, band.high, color=colour, alpha=0.2, lw=0, zorder=0)
            name += f" [{band.low:.2f}, {band.high:.2f}]"
        ax.axvline(100 * accuracy, color=colour, ls=style, label=name)
    ax.set_xlabel("test accuracy (%)" + (f"; bands: 95 % interval, {test_size} test images"
                                         if test_size is not None else ""))
    ax.set_ylabel("models")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8 if test_size is not None else None)
    return fig
