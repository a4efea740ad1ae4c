"""Studies on a zoo beyond the main table: the paper's Table 3 (sensitivity to the top models), Figure 2
(accuracy against the fine-tuning cost of a growing zoo) and a held-out-size sweep (not in the paper).

Each study is a loop of :func:`soupkit.experiments.run.run_methods` over one setting (models eliminated, models
fine-tuned, held-out images) that writes ``<out_dir>/<setting>/<method>.json`` and ``<out_dir>/records.csv``
(one row per run, the setting in its own column); the tables and figures are drawn from that file.

Every test accuracy carries its 95 % interval over test images: each row of ``records.csv`` has its record's
path (``record_path``) and the percentile-bootstrap bounds ``test_low`` / ``test_high`` (fractions) of the
per-image predictions kept beside the record (:func:`soupkit.experiments.results.with_test_intervals`); tables show them
as ``... low (%)`` / ``... high (%)`` columns and figures as shaded bands.

    records = top_models_study("outputs/zoo", "outputs/top_models", [0, 10, 19], heldout_size=1000)
    fig = plot_top_models(read_csv("outputs/top_models/records.csv"), "Embedded zoo")
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd

from soupkit.experiments.plots import (device_title, legend_below, mark_broken_axis, method_colour, method_handles,
                                       method_style)
from soupkit.experiments.results import with_test_intervals, write_csv
from soupkit.experiments.run import RunSpec, run_method, run_methods, zoo_table
from soupkit.methods.registry import DISPLAY
from soupkit.methods.result import SoupResult
from soupkit.zoo.sources import open_zoo

__all__ = [
    "PAPER_MODELS", "scaled_counts", "remaining_after_top", "individual_heldout_accuracies",
    "ranked_models", "top_models_study", "top_models_table", "growing_zoo", "finetuning_cost_study",
    "cost_to_reach", "heldout_size_study", "heldout_size_table", "plot_top_models", "plot_finetuning_cost", "plot_heldout_size",
]

PAPER_MODELS = 72  # fine-tunes of the paper's ViT-B/32 zoo (model-soups' checkpoints)


# ---- Table 3: sensitivity to the top models -----------------------------------------------------------------
def scaled_counts(paper_counts: Sequence[int], k: int, paper_models: int = PAPER_MODELS) -> list[int]:
    """The paper's numbers of eliminated models (out of ``paper_models``) scaled to a zoo of ``k`` models.

    ``c * k / paper_models`` rounded half up, capped at ``k - 1`` so that one model always remains; e.g. the paper's
    0 / 2 / 22 / 42 of 72 become 0 / 1 / 10 / 19 of 32. At ``k == paper_models`` the counts are the paper's.
    """
    if k < 1:
        raise ValueError(f"a zoo needs at least one model, got k={k}")
    bad = [c for c in paper_counts if not 0 <= c < paper_models]
    if bad:
        raise ValueError(f"counts {bad} are not in [0, {paper_models})")
    return [min(k - 1, int(math.floor(c * k / paper_models + 0.5))) for c in paper_counts]


def remaining_after_top(heldout_accuracies: Sequence[float], n: int) -> tuple[int, ...]:
    """Zoo indices left after eliminating the ``n`` models of highest held-out accuracy, in zoo order.

    Ties rank the lower index first, as the greedy soup sorts (so eliminating the top 1 removes the model
    the greedy soup would have started from).

    Args:
        heldout_accuracies: [K] held-out accuracy of each model, zoo order.
        n: models to eliminate, 0 <= n < K.
    """
    k = len(heldout_accuracies)
    if not 0 <= n < k:
        raise ValueError(f"can eliminate 0 to {k - 1} of {k} models, not {n}")
    ranked = sorted(range(k), key=lambda j: (-heldout_accuracies[j], j))
    return tuple(sorted(ranked[n:]))


def individual_heldout_accuracies(zoo_dir: str | os.PathLike, out_dir: str | os.PathLike,
                                  heldout_size: int | None = None, **spec_fields: Any) -> list[float]:
    """Held-out accuracy of every model of the zoo on the held-out images the soups use ([K], zoo order).

    Runs the ``best`` method (which evaluates every model) and reads the accuracies from its saved result
    ``<out_dir>/best/``; its record is ``<out_dir>/best.json``.
    """
    out = Path(out_dir)
    spec = RunSpec(zoo_dir=str(zoo_dir), method="best", record=str(out / "best.json"), save_dir=str(out / "best"),
                   heldout_size=heldout_size, **spec_fields)
    run_method(spec)
    return [float(a) for a in SoupResult.load(out / "best").stats["heldout_accuracies"]]


def ranked_models(zoo_dir: str | os.PathLike, study_dir: str | os.PathLike) -> pd.DataFrame:
    """The zoo's models (:func:`~soupkit.experiments.run.zoo_table`), best first by ``study_heldout_acc``: held-out
    accuracy on the study's held-out images, read from ``<study_dir>/best/`` (:func:`individual_heldout_accuracies`)."""
    table = zoo_table(open_zoo(zoo_dir))
    table["study_heldout_acc"] = SoupResult.load(Path(study_dir) / "best").stats["heldout_accuracies"]
    return table.sort_values(["study_heldout_acc", "index"], ascending=[False, True]).reset_index(drop=True)


def _sweep(zoo_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: Sequence[tuple[str, dict[str, Any]]],
           methods: Sequence[str], options: dict[str, dict[str, Any]] | None, progress: bool,
           **spec_fields: Any) -> pd.DataFrame:
    """Run ``methods`` once per setting ``(name, {column: value, ..., "spec": {RunSpec fields}})`` in this
    process; records go to ``<out_dir>/<name>/``, all of them to ``<out_dir>/records.csv`` with each record's
    ``record_path`` and its test interval ``test_low`` / ``test_high`` (fractions, NaN for runs that did not fit)."""
    rows = []
    k_all = len(open_zoo(zoo_dir).records)  # once: opening a zoo checks every checkpoint's sha256
    for name, setting in settings:
        columns = {key: value for key, value in setting.items() if key != "spec"}
        if progress:
            print(f"{name}: {', '.join(methods)}", flush=True)
        spec = {**spec_fields, **setting.get("spec", {})}
        k = len(spec["models"]) if spec.get("models") is not None else k_all
        # b above K means one block of all K (make_soup would warn): say so without the warning
        fitted = {m: {**o, "model_batch_size": min(o["model_batch_size"], k)} if "model_batch_size" in o else o
                  for m, o in (options or {}).items()}
        records = run_methods(zoo_dir, Path(out_dir) / name, methods, isolate=False, progress=False,
                              options=fitted, **spec)
        rows += [{**columns, **record, "record_path": str(Path(out_dir) / name / f"{record['method']}.json")}
                 for record in records]
    frame = with_test_intervals(rows)
    write_csv(frame, Path(out_dir) / "records.csv")
    return frame


def top_models_study(zoo_dir: str | os.PathLike, out_dir: str | os.PathLike, counts: Sequence[int],
                     methods: Sequence[str] = ("greedy", "mehl+"), options: dict[str, dict[str, Any]] | None = None,
                     paper_counts: Sequence[int] | None = None, heldout_size: int | None = None,
                     progress: bool = False, **spec_fields: Any) -> pd.DataFrame:
    """The paper's Table 3: each method on the zoo minus its top-n models, for each n of ``counts``.

    Models are ranked by held-out accuracy on the same held-out images the soups learn from
    (:func:`individual_heldout_accuracies`), as the greedy soup ranks them. A count given twice runs once.

    Args:
        counts: numbers of models to eliminate (e.g. :func:`scaled_counts` of the paper's 0 / 2 / 22 / 42).
        options: per-method ``make_soup`` options, ``{method: {...}}``.
        paper_counts: the paper's count each of ``counts`` was scaled from (same order), kept as a column.
        **spec_fields: other :class:`~soupkit.experiments.run.RunSpec` fields (``batch_size``, ``seed``...).
    Returns:
        one record per (count, method) with ``eliminated`` (n), ``eliminated_models`` (zoo indices, best
        first), ``paper_eliminated`` (if given), the run's record (``test_accuracy``, ``num_models``...),
        ``record_path`` and ``test_low`` / ``test_high``.
    """
    if paper_counts is not None and len(paper_counts) != len(counts):
        raise ValueError(f"{len(counts)} counts but {len(paper_counts)} paper counts")
    paper_of: dict[int, int] = {}
    for n, c in zip(counts, paper_counts or ()):
        paper_of.setdefault(n, c)  # a count scaled from two of the paper's: the first one
    accs = individual_heldout_accuracies(zoo_dir, Path(out_dir), heldout_size, **spec_fields)
    ranked = sorted(range(len(accs)), key=lambda j: (-accs[j], j))
    settings = []
    for n in dict.fromkeys(counts):  # first occurrence of each count, in order
        columns = {"eliminated": n, "eliminated_models": str(ranked[:n])}
        if n in paper_of:
            columns["paper_eliminated"] = paper_of[n]
        settings.append((f"top{n}", {**columns, "spec": {"models": remaining_after_top(accs, n)}}))
    return _sweep(zoo_dir, out_dir, settings, methods, options, progress, heldout_size=heldout_size, **spec_fields)


def _wide(records: pd.DataFrame, index: str, value: str) -> pd.DataFrame:
    """``records[value]`` with one row per ``index`` (sorted) and one column per method (first-seen order); NaN
    where a run has none (a run that did not fit, no predictions)."""
    methods = list(dict.fromkeys(records["method"]))
    values = pd.to_numeric(records[value], errors="coerce")
    wide = values.groupby([records[index], records["method"]]).mean().unstack("method")
    return wide.reindex(columns=methods).sort_index()


def top_models_table(records: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Test accuracy (%) per number of eliminated models (rows) and method (columns), the paper's beside.

    Each method's ``<Method> (%)`` column is followed by ``<Method> low (%)`` and ``<Method> high (%)``: its
    95 % percentile-bootstrap interval over test images (:func:`soupkit.experiments.results.with_test_intervals`; NaN
    where the run kept no predictions).

    Args:
        records: :func:`top_models_study` records (or its ``records.csv``).
        paper: ``paper_table("table3_top_models")`` (eliminated, method, test_accuracy in %); matched to our
            rows through the records' ``paper_eliminated`` column.
    """
    records = with_test_intervals(records)
    acc, low, high = (_wide(records, "eliminated", v) * 100 for v in ("test_accuracy", "test_low", "test_high"))
    columns = {}
    for m in acc.columns:
        name = DISPLAY.get(m, m)
        columns[f"{name} (%)"], columns[f"{name} low (%)"], columns[f"{name} high (%)"] = acc[m], low[m], high[m]
    table = pd.DataFrame(columns, index=acc.index).reset_index()
    first = records.groupby("eliminated").first()
    table.insert(1, "models left", first["num_models"].loc[table["eliminated"]].to_numpy())
    if paper is not None and "paper_eliminated" in records:
        counts = first["paper_eliminated"].loc[table["eliminated"]].to_numpy()
        table.insert(0, "paper eliminated (of 72)", counts)
        theirs = paper.pivot_table(index="eliminated", columns="method", values="test_accuracy")
        for method in theirs.columns:
            table[f"paper {DISPLAY.get(method, method)} (%)"] = [theirs[method].get(c, np.nan) for c in counts]
    return table


# ---- Figure 2: test accuracy against the fine-tuning cost ---------------------------------------------------
def growing_zoo(finetune_seconds: Sequence[float], sizes: Sequence[int]) -> pd.DataFrame:
    """The first ``n`` models of a zoo for each ``n`` of ``sizes``, with what fine-tuning them cost.

    Args:
        finetune_seconds: [K] measured fine-tuning seconds of each model, zoo order.
        sizes: numbers of models, each in 1..K.
    Returns:
        one row per size: ``num_finetuned``, ``models`` (tuple of zoo indices 0..n-1) and
        ``finetune_seconds`` (sum of the first n models' seconds).
    """
    k = len(finetune_seconds)
    bad = [n for n in sizes if not 1 <= n <= k]
    if bad:
        raise ValueError(f"sizes {bad} are not in 1..{k}")
    cumulative = np.cumsum(np.asarray(finetune_seconds, dtype=float))
    return pd.DataFrame({"num_finetuned": list(sizes), "models": [tuple(range(n)) for n in sizes],
                         "finetune_seconds": [float(cumulative[n - 1]) for n in sizes]})


def finetuning_cost_study(zoo_dir: str | os.PathLike, out_dir: str | os.PathLike, sizes: Sequence[int],
                          methods: Sequence[str] = ("greedy", "mehl+"),
                          options: dict[str, dict[str, Any]] | None = None, progress: bool = False,
                          seconds_per_model: float | None = None, **spec_fields: Any) -> pd.DataFrame:
    """The paper's Figure 2: each method on the first n models of the zoo, for each n of ``sizes``.

    ``seconds_per_model`` replaces the zoo's measured fine-tuning seconds (needed for zoos that do not record
    them, such as model-soups' released checkpoints).

    Returns:
        one record per (n, method) with ``num_finetuned``, ``finetune_seconds`` (the zoo's measured
        fine-tuning seconds of those n models), the run's record, ``record_path`` and ``test_low`` /
        ``test_high`` (95 % interval over test images, fractions).
    """
    seconds = [r.get("finetune_seconds") for r in open_zoo(zoo_dir).records]
    if seconds_per_model:
        seconds = [float(seconds_per_model)] * len(seconds)
    elif any(s is None for s in seconds):
        raise ValueError(f"{zoo_dir}: its records hold no fine-tuning time (model-soups' release has none); "
                         "pass seconds_per_model (notebook 06: the seconds_per_model parameter)")
    grow = growing_zoo(seconds, sizes)
    settings = [(f"first{row.num_finetuned}", {"num_finetuned": row.num_finetuned,
                                               "finetune_seconds": row.finetune_seconds,
                                               "spec": {"models": row.models}}) for row in grow.itertuples()]
    return _sweep(zoo_dir, out_dir, settings, methods, options, progress, **spec_fields)


def cost_to_reach(records: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per method, the cheapest zoo whose soup reaches ``target`` test accuracy (fraction): the paper's
    "to attain 81 %, Greedy-Soup requires over 200 GPU hours while MEHL-Soup+ takes fewer than 100".

    Args:
        records: :func:`finetuning_cost_study` records (``method``, ``num_finetuned``, ``finetune_seconds``,
            ``test_accuracy``).
    Returns:
        one row per method: ``finetune_seconds`` and ``num_finetuned`` of that zoo (NaN if none reaches it).
    """
    rows = []
    for method, runs in records.groupby("method", sort=False):
        reached = runs[runs["test_accuracy"] >= target].sort_values("finetune_seconds")
        first = reached.iloc[0] if len(reached) else None
        rows.append({"method": method,
                     "finetune_seconds": float(first["finetune_seconds"]) if first is not None else np.nan,
                     "num_finetuned": float(first["num_finetuned"]) if first is not None else np.nan})
    return pd.DataFrame(rows)


# ---- held-out size ---------------------------------------------------------------------------------------------
def heldout_size_study(zoo_dir: str | os.PathLike, out_dir: str | os.PathLike, sizes: Sequence[int],
                       methods: Sequence[str] = ("greedy", "learned+", "mehl+"),
                       options: dict[str, dict[str, Any]] | None = None, progress: bool = False,
                       **spec_fields: Any) -> pd.DataFrame:
    """Each method with the first n held-out images (a class-balanced prefix), for each n of ``sizes``.

    Returns:
        one record per (n, method); the record's ``heldout_size`` is n and ``heldout_accuracy`` is measured
        on those n images, so ``heldout_accuracy - test_accuracy`` shows over-fitting of the held-out set;
        ``record_path`` and ``test_low`` / ``test_high`` as in the other studies.
    """
    settings = [(f"heldout{n}", {"spec": {"heldout_size": int(n)}}) for n in sizes]
    return _sweep(zoo_dir, out_dir, settings, methods, options, progress, **spec_fields)


def heldout_size_table(records: pd.DataFrame) -> pd.DataFrame:
    """Test and held-out accuracy (%) per held-out size (rows) and method: ``<Method> test (%)``, its 95 %
    interval over test images ``<Method> test low (%)`` / ``<Method> test high (%)``
    (:func:`soupkit.experiments.results.with_test_intervals`), then ``<Method> held-out (%)`` (the images the soup learned
    from: no interval, it is not an estimate of accuracy on new images)."""
    records = with_test_intervals(records)
    wide = {v: _wide(records, "heldout_size", v) * 100
            for v in ("test_accuracy", "test_low", "test_high", "heldout_accuracy")}
    columns = {}
    for m in wide["test_accuracy"].columns:
        name = DISPLAY.get(m, m)
        columns[f"{name} test (%)"] = wide["test_accuracy"][m]
        columns[f"{name} test low (%)"] = wide["test_low"][m]
        columns[f"{name} test high (%)"] = wide["test_high"][m]
        columns[f"{name} held-out (%)"] = wide["heldout_accuracy"][m]
    return pd.DataFrame(columns, index=wide["test_accuracy"].index).reset_index()


# ---- figures --------------------------------------------------------------------------------------------------
def _line(ax: plt.Axes, x: Sequence[float], y: Sequence[float], method: str, **kw: Any) -> str:
    """One method's line; returns its colour."""
    style = {**method_style(method), **kw}
    (line,) = ax.plot(x, y, label=DISPLAY.get(method, method), **style)
    return line.get_color()


def _test_line(ax: plt.Axes, rows: pd.DataFrame, x: str, method: str, **kw: Any) -> bool:
    """The method's test accuracy (%) against ``rows[x]`` with its 95 % interval over test images as a shaded
    band (where the rows have ``test_low`` / ``test_high``); whether a band was drawn."""
    colour = _line(ax, rows[x], 100 * rows["test_accuracy"], method, **kw)
    if "test_low" not in rows or "test_high" not in rows:
        return False
    low, high = (pd.to_numeric(rows[c], errors="coerce") for c in ("test_low", "test_high"))
    has = low.notna() & high.notna()
    if not has.any():
        return False
    ax.fill_between(rows[x].to_numpy(dtype=float), 100 * low.to_numpy(dtype=float), 100 * high.to_numpy(dtype=float),
                    where=has.to_numpy(), color=colour, alpha=0.15, lw=0,
                    interpolate=False)
    # a lone point (its neighbours have no interval) has no band to span: an error bar instead
    lone = has & ~(has.shift(1, fill_value=False) | has.shift(-1, fill_value=False))
    if lone.any():
        y = 100 * pd.to_numeric(rows["test_accuracy"], errors="coerce")[lone]
        ax.errorbar(rows[x][lone], y, yerr=[y - 100 * low[lone], 100 * high[lone] - y], fmt="none",
                    ecolor=colour, alpha=0.5, capsize=3)
    return True


def _finish(fig: plt.Figure, ax: plt.Axes, title: str, handles: list[Any] | None = None) -> plt.Figure:
    """Grid, broken-axis mark (accuracy is zoomed onto the data), title and a legend right of the axes."""
    ax.grid(alpha=0.3)
    mark_broken_axis(ax, "y")
    ax.set_title(device_title(title), fontsize=10)
    fig.tight_layout()
    legend_below(fig, handles if handles is not None else ax.get_legend_handles_labels()[0], ncol=3)
    return fig


def plot_top_models(records: pd.DataFrame, title: str, paper: pd.DataFrame | None = None) -> plt.Figure:
    """Test accuracy against the number of top models eliminated: ours (left, shaded: the 95 % interval over
    test images of each run, from the records' ``test_low`` / ``test_high``), the paper's (right)."""
    records = with_test_intervals(records)
    panels = 2 if paper is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    k = int((records["num_models"] + records["eliminated"]).iloc[0])  # models in the whole zoo
    for (ax, frame, name) in zip(axes[0], [records] + ([paper] if paper is not None else []), [f"{k}", "72"]):
        banded = False
        for method, rows in frame.groupby("method", sort=False):
            rows = rows.sort_values("eliminated")
            if frame is records:  # records hold fractions, the paper's table %
                banded |= _test_line(ax, rows, "eliminated", method)
            else:
                _line(ax, rows["eliminated"], rows["test_accuracy"], method)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"top models eliminated (of {name})")
        ax.set_ylabel("test accuracy (%)" + (", band: 95 % interval" if banded else ""))
        ax.set_title("ours" if frame is records else "paper (ViT-B/32, ImageNet)", fontsize=10)
        ax.grid(alpha=0.3)
        mark_broken_axis(ax, "y")
    fig.suptitle(device_title(title))
    fig.tight_layout()
    methods = list(dict.fromkeys(list(records["method"]) + (list(paper["method"]) if paper is not None else [])))
    handles = method_handles(methods)
    if any(len(ax.collections) for ax in axes[0]):
        handles.append(Patch(facecolor="0.5", alpha=0.25, label="ours: 95 % interval over test images"))
    legend_below(fig, handles)
    return fig


def plot_finetuning_cost(records: pd.DataFrame, title: str, target: float | None = None) -> plt.Figure:
    """Test accuracy against the measured cumulative fine-tuning seconds, one line per method, each point
    labelled with its number of fine-tuned models, shaded: the 95 % interval over test images (records'
    ``test_low`` / ``test_high``); ``target`` (fraction) draws a dashed level."""
    records = with_test_intervals(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    banded = False
    top = records.groupby("num_finetuned")["test_accuracy"].max()
    for method, rows in records.groupby("method", sort=False):
        rows = rows.sort_values("num_finetuned")
        banded |= _test_line(ax, rows, "finetune_seconds", method)
        for x, y, n in zip(rows["finetune_seconds"], 100 * rows["test_accuracy"], rows["num_finetuned"]):
            # the highest method's label above its point, the others' below: labels at one x do not overprint
            above = pd.notna(y) and y >= 100 * top.get(n, np.nan)
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 5 if above else -11), fontsize=7,
                        color=method_colour(method))
    if target is not None:
        ax.axhline(100 * target, color="black", ls="--", lw=0.8, label=f"target {100 * target:.2f} %")
    ax.set_xlabel("fine-tuning cost of these models: measured seconds (zoo records), cumulative\n"
                  "(numbers: fine-tuned models in the soup)")
    ax.set_ylabel("test accuracy (%)" + (", band: 95 % interval" if banded else ""))
    handles = method_handles(records["method"])
    if banded:
        handles.append(Patch(facecolor="0.5", alpha=0.25, label="95 % interval over test images"))
    if target is not None:
        handles.append(Line2D([], [], color="black", ls="--", lw=0.8, label=f"target {100 * target:.2f} %"))
    return _finish(fig, ax, title, handles)


def plot_heldout_size(records: pd.DataFrame, title: str) -> plt.Figure:
    """Test accuracy (solid, shaded: its 95 % interval over test images) and held-out accuracy (dashed)
    against the held-out size (log scale)."""
    records = with_test_intervals(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    banded = False
    for method, rows in records.groupby("method", sort=False):
        rows = rows.sort_values("heldout_size")
        banded |= _test_line(ax, rows, "heldout_size", method, ls="-")  # dashed: held-out
        ax.plot(rows["heldout_size"], 100 * rows["heldout_accuracy"], ls="--", marker=".", alpha=0.6,
                color=method_colour(method))
    sizes = sorted(records["heldout_size"].unique())
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("held-out images (class-balanced)")
    ax.set_ylabel("accuracy (%): test solid" + (" (band: 95 %)" if banded else "") + ", held-out dashed")
    handles = method_handles(records["method"], lines=False)
    handles.append(Line2D([], [], color="0.3", ls="-", label="test accuracy"))
    if banded:
        handles.append(Patch(facecolor="0.5", alpha=0.25, label="test: 95 % interval over test images"))
    handles.append(Line2D([], [], color="0.3", ls="--", marker=".", alpha=0.6, label="held-out accuracy"))
    return _finish(fig, ax, title, handles)
