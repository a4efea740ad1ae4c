"""Figures drawn from result files (never from in-memory state only), saved atomically as PNG.

Every figure takes its method colours from the method registry (``soupkit.methods.registry.METHODS``: one
colour per method family, a method and its "+" and "released" variants share it; :func:`method_style` tells the
variants apart by the registry's marker and line style), has a legend placed outside the data, draws accuracy on an axis from 0 or on an axis marked
broken (:func:`mark_broken_axis`), and draws a run stopped by its memory cap as "did not fit (memory cap)".
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
import numpy as np
import pandas as pd

from soupkit.experiments.stats import wilson_interval
from soupkit.io import atomic_write
from soupkit.methods.registry import DISPLAY, METHODS

__all__ = ["OTHER_COLOUR", "family_colours", "DID_NOT_FIT", "BROKEN_AXIS_GID", "method_family", "method_colour",
           "method_style", "family_handles", "mark_broken_axis", "device_title", "run_title", "save_figure", "plot_main_table", "plot_shifts",
           "plot_zoo_accuracies", "plot_growing"]

OTHER_COLOUR = "tab:gray"  # a name that is not a registered method
DID_NOT_FIT = "did not fit (memory cap)"
DID_NOT_FIT_STYLE: dict[str, Any] = {"facecolor": "0.92", "edgecolor": "0.55", "hatch": "////", "lw": 0}
BROKEN_AXIS_GID = "axis-break"  # the gid of the mark that says an axis does not start at 0 (tests look for it)


def family_colours() -> dict[str, str]:
    """``{family: colour}`` of the registered methods, in legend order (one colour per family)."""
    return {m.family: m.colour for m in sorted(METHODS.values(), key=lambda m: m.legend_row)}


def method_family(method: str) -> str:
    """``"mehl+released"`` -> ``"mehl"``, ``"learned+"`` -> ``"learned"`` (the registry's); other names are their
    own family."""
    return METHODS[method].family if method in METHODS else str(method)


def method_colour(method: str) -> str:
    """The colour of ``method``'s family (the registry's; :data:`OTHER_COLOUR` for other names)."""
    return METHODS[method].colour if method in METHODS else OTHER_COLOUR


def method_style(method: str) -> dict[str, Any]:
    """Colour, marker and line style of ``method``: a family's plain / "+" / released variants share the colour
    and differ in marker (square / circle / diamond) and line (dashed / solid / dotted)."""
    method = str(method)
    if method not in METHODS:
        return {"color": OTHER_COLOUR, "marker": "o", "ls": "-"}
    m = METHODS[method]
    return {"color": m.colour, "marker": m.marker, "ls": m.linestyle}


def _legend_member(family: str) -> Any:
    """The method whose marker a family's legend entry shows: its "+" variant if it has one, else its first."""
    members = [(name, m) for name, m in METHODS.items() if m.family == family]
    return next((m for name, m in members if name.endswith("+")), members[0][1])


def family_handles(methods: Iterable[str]) -> list[Line2D]:
    """Legend entries, one per family present in ``methods`` (in legend order)."""
    methods = [str(m) for m in methods]
    present = {method_family(m) for m in methods}
    out = [Line2D([], [], color=m.colour, marker=m.marker, ls="-", lw=2, label=m.family_display)
           for m in (_legend_member(f) for f in family_colours() if f in present)]
    out += [Line2D([], [], color=method_colour(m), marker=method_style(m)["marker"], ls="-", lw=2, label=str(m))
            for m in dict.fromkeys(methods) if m not in METHODS]
    variants = [(any(m in METHODS and METHODS[m].learned and METHODS[m].marker == "s" for m in methods), "s",
                 "plain (one λ per model)"),
                (any(m.endswith("+") for m in methods), "o", "+ (one λ per layer)"),
                (any(m.endswith("released") for m in methods), "D", "released code")]
    if sum(flag for flag, _, _ in variants) > 1:  # the markers tell a family's variants apart
        out += [Line2D([], [], color="0.35", marker=mk, ls="none", label=label) for flag, mk, label in variants if flag]
    return out


def method_handles(methods: Iterable[str], lines: bool = True) -> list[Line2D]:
    """Legend entries, one per method, in its :func:`method_style`."""
    out = []
    for m in dict.fromkeys(methods):
        style = method_style(m)
        out.append(Line2D([], [], color=style["color"], marker=style["marker"], ls=style["ls"] if lines else "none",
                          label=DISPLAY.get(m, m)))
    return out


def mark_broken_axis(ax: plt.Axes, axis: str = "y") -> None:
    """Mark ``ax``'s ``axis`` as not starting at 0: a "//" break on the spine near the origin and the axis label
    saying so (an axis zoomed onto the data otherwise exaggerates sub-point gaps)."""
    if axis == "y":
        xy, rotation = (0.0, 0.035), 0
        ax.set_ylabel(ax.get_ylabel() + "\n(axis broken: does not start at 0)")
    else:
        xy, rotation = (0.035, 0.0), 90
        ax.set_xlabel(ax.get_xlabel() + " (axis broken: does not start at 0)")
    ax.text(*xy, "//", transform=ax.transAxes, ha="center", va="center", rotation=rotation, fontsize=11,
            fontweight="bold", clip_on=False, zorder=10, gid=BROKEN_AXIS_GID,
            bbox={"boxstyle": "square,pad=0.05", "facecolor": "white", "edgecolor": "none"})


def device_title(text: str) -> str:
    """Device names in one case in titles: ``cpu`` -> ``CPU``, ``cuda`` / ``cuda:0`` -> ``GPU``."""
    # not a build tag such as torch's "2.13.0+cpu"
    text = re.sub(r"(?<![+\w])cpu\b", "CPU", str(text))
    return re.sub(r"(?<![+\w])cuda(:\d+)?\b", "GPU", text)


def run_title(zoo_description: str, heldout_size: int | None, device: str) -> str:
    """A run's figure title from ``BaseZoo.describe()``, the held-out images used (None: all) and the device:
    "Embedded zoo: 32 ViT fine-tunes on Animal-MNIST, 2000 held-out images, CPU"."""
    held = "all" if heldout_size is None else f"{heldout_size}"
    return device_title(f"{zoo_description[:1].upper()}{zoo_description[1:]}, {held} held-out images, {device}")


def legend_below(fig: plt.Figure, handles: Sequence[Any], ncol: int | None = None, **kw: Any) -> None:
    """One legend for the figure, centred under its axes (outside every axes: it hides no data); call after
    ``tight_layout`` (``save_figure`` keeps it in the saved image)."""
    handles = list(handles)
    ncol = ncol or (len(handles) if len(handles) <= 6 else -(-len(handles) // 2))
    nrows = -(-len(handles) // ncol)
    if nrows > 1:  # matplotlib fills a legend column by column: pad and reorder so that it reads row by row
        handles += [Line2D([], [], ls="none", label=" ")] * (nrows * ncol - len(handles))
        handles = [handles[r * ncol + c] for c in range(ncol) for r in range(nrows)]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=8,
               frameon=False, **kw)


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Save ``fig`` to ``path`` atomically (:func:`soupkit.io.atomic_write`)."""
    path = Path(path)
    # the temp file's name does not end in path's suffix, so the format is named, not guessed from it
    fmt = path.suffix[1:] or plt.rcParams["savefig.format"]
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=fmt,
                                                      metadata={"Software": None}))


def _numeric(table: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(table[column], errors="coerce") if column in table else pd.Series(np.nan, index=table.index)


def _text(table: pd.DataFrame, column: str) -> pd.Series:
    return table[column].fillna("").astype(str) if column in table else pd.Series("", index=table.index)


def _cap_mb(note: str) -> float | None:
    """The memory cap of a "did not fit (> 60 MB)" note, MB."""
    found = re.search(r">\s*([0-9.]+)\s*MB", note)
    return float(found.group(1)) if found else None


def _unfit_label(note: str) -> str:
    """``"did not fit (> 60 MB)"`` -> ``"did not fit (memory cap 60 MB)"``."""
    cap = _cap_mb(note)
    return DID_NOT_FIT if cap is None else f"did not fit (memory cap {cap:g} MB)"


def _differences(table: pd.DataFrame, reference: str,
                 record_dir: str | os.PathLike | None) -> tuple[pd.DataFrame, str] | None:
    """Test accuracy minus the reference's (points) with a 95 % interval per row, and how the interval was made.

    Paired bootstrap over the test images where ``record_dir`` holds both runs' predictions
    (``<record_dir>/<method>.json``); otherwise each side's own interval combined in quadrature, which ignores
    that the two runs are scored on the same images (wider than the paired interval: conservative).
    """
    rows = table.index[table["method"] == reference]
    acc, low, high = (_numeric(table, c) for c in ("test acc (%)", "test low (%)", "test high (%)"))
    if not len(rows) or pd.isna(acc[rows[0]]):
        return None
    r = rows[0]
    ref_correct = None
    if record_dir is not None:
        from soupkit.experiments.run import read_correct  # noqa: PLC0415  (experiment imports torch)
        from soupkit.experiments.stats import paired_difference  # noqa: PLC0415

        def correct(method: str, accuracy: float) -> np.ndarray | None:
            try:
                c = read_correct(Path(record_dir) / f"{method}.json")
            except (FileNotFoundError, OSError, ValueError):
                return None
            return c if c.size and abs(100 * c.mean() - accuracy) <= 50 / c.size else None  # stale file: unpaired

        ref_correct = correct(reference, acc[r])
    out, kinds = [], set()
    for i, method in zip(table.index, table["method"]):
        if i == r or pd.isna(acc[i]):
            out.append((np.nan, np.nan, np.nan))
            continue
        c = correct(method, acc[i]) if ref_correct is not None else None
        if c is not None and c.shape == ref_correct.shape:
            d = paired_difference(c, ref_correct).scaled(100)
            out.append((d.estimate, d.low, d.high))
            kinds.add("paired bootstrap over test images")
            continue
        d = acc[i] - acc[r]
        if pd.notna(low[i]) and pd.notna(high[i]) and pd.notna(low[r]) and pd.notna(high[r]):
            out.append((d, d - np.hypot(acc[i] - low[i], high[r] - acc[r]),
                        d + np.hypot(high[i] - acc[i], acc[r] - low[r])))
            kinds.add("unpaired, conservative")
        else:
            out.append((d, np.nan, np.nan))
    frame = pd.DataFrame(out, index=table.index, columns=["diff", "low", "high"])
    return frame, " / ".join(sorted(kinds)) or "no interval"


def _row_notes(ax: plt.Axes, rows: np.ndarray, notes: Iterable[str], x: float = 0.0) -> None:
    for y, note in zip(rows, notes):
        if note:
            ax.annotate(note, (x, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7,
                        color="0.15", bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"})


def _paper_value(value: float, unit: str) -> str:
    return f"paper {value:,.0f} {unit}" if value >= 10 else f"paper {value:.3g} {unit}"


def plot_main_table(table: pd.DataFrame, title: str, reference: str = "uniform",
                    record_dir: str | os.PathLike | None = None) -> plt.Figure:
    """Panels from :func:`soupkit.experiments.results.main_table`, one row per method: test accuracy, its difference to
    ``reference``, construction time, peak memory.

    Accuracy (axis from 0 to 100 %): ours as a point with its 95 % interval over test images
    (``test low (%)`` / ``test high (%)``), the paper's (``paper acc (%)``, its own model and data set) as a
    hollow diamond. Difference to ``reference`` (points, 0 marked): paired-bootstrap intervals when
    ``record_dir`` (the notebook's record folder, ``<record_dir>/<method>.json``) holds the predictions, else
    the two intervals combined (wider; the x label says which). Time and memory: our bars, the paper's value as
    text. A run stopped by its memory cap is a hatched row "did not fit (memory cap ...)" with the cap marked;
    methods with no construction (best, uniform, ensemble) say "n/a" in the time and memory panels.
    """
    table = table.reset_index(drop=True)
    methods = table["method"].astype(str)
    names = [DISPLAY.get(m) or m for m in methods]
    rows = np.arange(len(table))
    notes = _text(table, "note")
    unfit = notes.str.startswith("did not fit")
    caps = {c for c in (_cap_mb(n) for n in notes[unfit]) if c is not None}
    acc, low, high = (_numeric(table, c) for c in ("test acc (%)", "test low (%)", "test high (%)"))
    paper_acc = _numeric(table, "paper acc (%)")
    diffs = _differences(table, reference, record_dir)
    panels = ["acc"] + (["diff"] if diffs is not None else []) + ["time", "memory"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 0.36 * len(table) + 1.6), sharey=True,
                             gridspec_kw={"width_ratios": [1.25] + [1] * (len(panels) - 1)})
    ax_of = dict(zip(panels, axes))
    for ax in axes:
        for y in rows[unfit.to_numpy()]:
            ax.axhspan(y - 0.42, y + 0.42, **DID_NOT_FIT_STYLE, zorder=0)
        ax.grid(axis="x", alpha=0.3)

    ax = ax_of["acc"]
    for y, m, a, lo, hi in zip(rows, methods, acc, low, high):
        if pd.notna(a):
            style = method_style(m)
            err = [[a - lo], [hi - a]] if pd.notna(lo) and pd.notna(hi) else None
            ax.errorbar([a], [y], xerr=err, fmt=style["marker"], color=style["color"], ecolor=style["color"],
                        elinewidth=2, capsize=3, ms=6, zorder=3)
    shift_avg = _numeric(table, "shift avg (%)")
    has_shifts = shift_avg.notna().any()
    if has_shifts:  # the average over the zoo's distribution shifts: open markers a little above our point
        shift_low, shift_high = _numeric(table, "shift avg low (%)"), _numeric(table, "shift avg high (%)")
        for y, m, a, lo, hi in zip(rows, methods, shift_avg, shift_low, shift_high):
            if pd.notna(a):
                style = method_style(m)
                ax.errorbar([a], [y - 0.28], xerr=[[a - lo], [hi - a]] if pd.notna(lo) else None,
                            fmt=style["marker"], mfc="white", color=style["color"], ecolor=style["color"],
                            elinewidth=1, capsize=2, ms=5, zorder=3)
    has_paper = paper_acc.notna().any()
    if has_paper:
        # a little below our point, so that a paper value close to ours does not hide it
        ax.plot(paper_acc, rows + 0.28, "D", mfc="none", mec="black", ms=5, ls="none", zorder=4)
    ax.set_xlim(0, 102)  # from 0; a paper value of 99.3 % stays off the frame
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("test accuracy (%): ours, 95 % interval over test images"
                  + ("; ◇ paper" if has_paper else "") + ("\nopen: average over the distribution shifts" if has_shifts else ""))
    _row_notes(ax, rows, [_unfit_label(n) if bad else (n if pd.isna(a) else "")
                          for n, a, bad in zip(notes, acc, unfit)])

    if diffs is not None:
        frame, kind = diffs
        ax = ax_of["diff"]
        for y, m, (d, lo, hi) in zip(rows, methods, frame.itertuples(index=False)):
            if pd.notna(d):
                style = method_style(m)
                err = [[d - lo], [hi - d]] if pd.notna(lo) and pd.notna(hi) else None
                ax.errorbar([d], [y], xerr=err, fmt=style["marker"], color=style["color"], ecolor=style["color"],
                            elinewidth=2, capsize=3, ms=6, zorder=3)
        ax.axvline(0, color="black", lw=0.9)
        ref_row = int(rows[(methods == reference).to_numpy()][0])
        ax.annotate("reference", (0, ref_row), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=7, color="0.3", style="italic")
        span = np.nanmax(np.abs(frame.to_numpy(dtype=float))) if frame.notna().any().any() else 1.0
        span = span or 1.0  # every soup predicting alike (differences all 0) would make a singular axis
        ax.set_xlim(-1.15 * span, 1.15 * span)
        ax.set_xlabel(f"test accuracy − {DISPLAY.get(reference, reference)} (points)\n95 % interval: {kind}")

    for key, column, paper_column, unit, label in (
            ("time", "construction (s)", "paper construction (s)", "s", "soup construction time (s)"),
            ("memory", "peak memory (MB)", "paper memory (GB)", "GB", "measured peak memory (MB)")):
        ax = ax_of[key]
        ours, paper = _numeric(table, column), _numeric(table, paper_column)
        paper_notes = _text(table, "paper note")
        ax.barh(rows, ours.fillna(0.0), color=[method_colour(m) for m in methods], height=0.7, zorder=2)
        top = max([float(ours.max()) if ours.notna().any() else 1.0] + ([max(caps)] if key == "memory" and caps else []))
        ax.set_xlim(0, 1.75 * top)  # room for the paper's values beside the bars
        for y, m, v, p, pn, n, bad in zip(rows, methods, ours, paper, paper_notes, notes, unfit):
            parts = []
            if bad:
                parts.append("did not fit")
            elif m in METHODS and not METHODS[m].constructs:
                parts.append("n/a (no construction)")
            elif pd.isna(v):
                parts.append(n.split(" (")[0] if n else "no value")
            if pd.notna(p):
                parts.append(_paper_value(p, unit))
            elif key == "memory" and pn.startswith("did not fit"):
                parts.append("paper: " + pn)
            if parts:
                ax.annotate(", ".join(parts), (0 if pd.isna(v) else v, y), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=7, color="0.3")
        if key == "memory":
            for cap in caps:
                ax.axvline(cap, color="0.2", ls="--", lw=0.9, zorder=1)
        ax.set_xlabel(label + ("; text: paper" if paper.notna().any() else ""))
    axes[0].set_yticks(rows, names)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)  # first method on top
    fig.suptitle(device_title(title))
    fig.tight_layout()
    handles: list[Any] = family_handles(methods[acc.notna().to_numpy() | unfit.to_numpy()])
    handles.append(Line2D([], [], color="black", marker="o", ls="-", lw=1.5, label="ours: 95 % interval"))
    if has_shifts:
        handles.append(Line2D([], [], color="black", marker="o", mfc="white", ls="-", lw=1, label="ours, shift average"))
    if has_paper:
        handles.append(Line2D([], [], color="black", marker="D", mfc="none", ls="none", label="paper"))
    if unfit.any():
        handles.append(Patch(**DID_NOT_FIT_STYLE, label=DID_NOT_FIT))
    if caps:
        handles.append(Line2D([], [], color="0.2", ls="--", lw=0.9, label="memory cap"))
    legend_below(fig, handles)
    return fig


_SHIFT_MARKERS = ("o", "s", "^", "v", "D", "P", "X")


def plot_shifts(table: pd.DataFrame, title: str) -> plt.Figure:
    """Two panels from :func:`soupkit.experiments.results.shift_table`: (left) each method's average accuracy over
    the distribution shifts against its in-distribution test accuracy, both with their 95 % intervals over images
    (model-soups' figure of effective robustness); (right) each shift's accuracy per method with its interval,
    one marker per shift."""
    table = table.reset_index(drop=True)
    methods = table["method"].astype(str)
    shifts = [c[: -len(" acc (%)")] for c in table.columns
              if c.endswith(" acc (%)") and c != "test acc (%)" and not c.startswith("shift avg")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.32 * len(table) + 3.2),
                                      gridspec_kw={"width_ratios": [1, 1.15]})
    x, xlo, xhi = (_numeric(table, c) for c in ("test acc (%)", "test low (%)", "test high (%)"))
    y, ylo, yhi = (_numeric(table, c) for c in ("shift avg (%)", "shift avg low (%)", "shift avg high (%)"))
    for m, a, alo, ahi, b, blo, bhi in zip(methods, x, xlo, xhi, y, ylo, yhi):
        if pd.isna(a) or pd.isna(b):
            continue
        style = method_style(m)
        left.errorbar([a], [b], xerr=[[a - alo], [ahi - a]] if pd.notna(alo) else None,
                      yerr=[[b - blo], [bhi - b]] if pd.notna(blo) else None, fmt=style["marker"],
                      color=style["color"], ecolor=style["color"], elinewidth=1.5, capsize=2, ms=6, zorder=3)
    left.set_xlabel("in-distribution test accuracy (%)")
    left.set_ylabel(f"average accuracy over {len(shifts)} shifts (%)")
    left.grid(alpha=0.3)
    left.set_title("95 % intervals over images", fontsize=9)
    rows = np.arange(len(table))
    offsets = np.linspace(-0.25, 0.25, max(len(shifts), 1))
    for j, (name, dy) in enumerate(zip(shifts, offsets)):
        acc, lo, hi = (_numeric(table, f"{name} {c} (%)") for c in ("acc", "low", "high"))
        for r, m, a, alo, ahi in zip(rows, methods, acc, lo, hi):
            if pd.notna(a):
                right.errorbar([a], [r + dy], xerr=[[a - alo], [ahi - a]] if pd.notna(alo) else None,
                               fmt=_SHIFT_MARKERS[j % len(_SHIFT_MARKERS)], color=method_colour(m), ms=4,
                               elinewidth=1, capsize=1.5, zorder=3)
    right.set_yticks(rows, [DISPLAY.get(m) or m for m in methods])
    right.set_ylim(len(rows) - 0.5, -0.5)
    right.grid(axis="x", alpha=0.3)
    right.set_xlabel("accuracy on each shift (%), 95 % interval over its images")
    fig.suptitle(device_title(title))
    fig.tight_layout()
    handles: list[Any] = family_handles(methods[x.notna().to_numpy()])
    handles += [Line2D([], [], color="black", marker=_SHIFT_MARKERS[j % len(_SHIFT_MARKERS)], ls="none", label=name)
                for j, name in enumerate(shifts)]
    legend_below(fig, handles)
    return fig


def plot_zoo_accuracies(models: pd.DataFrame, uniform_test_accuracy: float, title: str,
                        probe_test_accuracy: float | None = None, test_size: int | None = None) -> plt.Figure:
    """Histogram of the fine-tunes' test accuracy (``soupkit.experiments.run.zoo_table``, fractions) with the uniform soup
    and, for embedded zoos, the linear probe every fine-tune started from.

    ``test_size`` (the number of test images, e.g. the uniform record's ``test_images``) adds the 95 % Wilson
    interval of a binomial accuracy on that many images (:func:`soupkit.experiments.stats.wilson_interval`): a band around
    the uniform soup (and the probe), and in the legend the half-width for a fine-tune of the zoo's mean
    accuracy -- differences between models smaller than that are within test-set noise. None: no intervals.
    The accuracy axis is zoomed onto the zoo and marked broken; the legend sits under the axes.
    """
    fig, ax = plt.subplots(figsize=(7, 4.2))  # room for the legend under the axes
    label = "individual fine-tunes"
    if test_size is not None and len(models):
        typical = wilson_interval(float(models.test_acc.mean()), test_size).scaled(100)
        label += f" (each ±{typical.half_width:.2f} pts, 95 %)"
    ax.hist(100 * models.test_acc, bins=16, color=method_colour("best"), alpha=0.75, label=label)
    marks = [(uniform_test_accuracy, method_colour("uniform"), "-", "uniform soup")]
    if probe_test_accuracy is not None:
        marks.append((probe_test_accuracy, "black", "--", "linear probe"))
    for accuracy, colour, style, name in marks:
        if test_size is not None:
            band = wilson_interval(float(accuracy), test_size).scaled(100)
            ax.axvspan(band.low, band.high, color=colour, alpha=0.15 if colour != "black" else 0.07, lw=0, zorder=0)
            name += f" {100 * accuracy:.2f} [{band.low:.2f}, {band.high:.2f}]"
        ax.axvline(100 * accuracy, color=colour, ls=style, lw=1.5, label=name)
    ax.set_xlabel("test accuracy (%)" + (f"; bands: 95 % interval, {test_size} test images"
                                         if test_size is not None else ""))
    ax.set_ylabel("models")
    ax.set_title(device_title(title))
    mark_broken_axis(ax, "x")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2 if probe_test_accuracy is None else 1,
              fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


# the two modes of notebook 12 share the method's registry colour and differ in line and marker
_GROWING_STYLE: dict[str, dict[str, Any]] = {"scratch": {"ls": "--", "marker": "s", "mfc": "white"},
                                             "grown": {"ls": "-", "marker": "o"}}


def plot_growing(table: pd.DataFrame, title: str) -> plt.Figure:
    """Notebook 12 (``soupkit.experiments.growing.growing_table``): against K, (a) test accuracy (%) with its 95 %
    interval, grown and from scratch; (b) construction seconds: scratch, grown per step and grown cumulative;
    (c) peak memory (MB) of each run."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colour = method_colour(str(table["method"].iloc[0])) if len(table) else OTHER_COLOUR
    sizes = sorted(_numeric(table, "size").dropna().astype(int).unique())
    for mode, style in _GROWING_STYLE.items():
        rows = table[table["mode"] == mode].sort_values("size")
        k = _numeric(rows, "size").to_numpy()
        line = {"color": colour, **style}
        acc = 100 * _numeric(rows, "test_accuracy").to_numpy()
        # the two modes' intervals side by side (x nudged apart on the log axis), not two bands over each other
        nudged = k * (1.04 if mode == "grown" else 1 / 1.04)
        if {"test_low", "test_high"} <= set(rows.columns):
            err = np.abs(np.vstack([acc - 100 * _numeric(rows, "test_low").to_numpy(),
                                    100 * _numeric(rows, "test_high").to_numpy() - acc]))
            axes[0].errorbar(nudged, acc, yerr=err, label=mode, capsize=3, **line)
        else:
            axes[0].plot(nudged, acc, label=mode, **line)
        if mode == "grown":
            axes[1].plot(k, _numeric(rows, "cumulative_seconds"), label="grown, cumulative", **line)
            axes[1].plot(k, _numeric(rows, "seconds"), label="grown, this step", color=colour, ls=":", marker="o",
                         mfc="white")
        else:
            axes[1].plot(k, _numeric(rows, "seconds"), label="scratch", **line)
        axes[2].plot(k, _numeric(rows, "peak_memory_mb"), label=mode, **line)
    labels = ("test accuracy (%), 95 % interval", "construction time (s)", "peak memory (MB)")
    for ax, label in zip(axes, labels):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("models K")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle(device_title(title), fontsize=10)
    fig.tight_layout()
    return fig
