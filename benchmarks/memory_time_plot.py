"""The figure: peak memory and seconds per epoch against K (``benchmark_memory_vs_k_<device>.png``).

``plot`` draws it from the result rows and summary of a run; ``plot_from_csv`` redraws it from a benchmark CSV
alone (``python benchmarks/memory_time.py --plot-only CSV``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from _bench_common import METHODS
from memory_time_analysis import TARGET_K, _value_at, analyse, read_rows


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path, title: str) -> Path:
    """Left: peak memory vs K (log-log) with the linear fits extended to K = 72; right: seconds per epoch.

    Colours from soupkit's one palette (:func:`soupkit.experiments.plots.method_colour`, as every other figure); one legend
    under both panels (it hides no point) and the notes wrapped inside their frames."""
    import textwrap  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415

    from soupkit.experiments.plots import device_title, legend_below, method_style  # noqa: PLC0415

    ok = [r for r in rows if r.get("status") == "ok"]
    labels = {"learned+": "Learned-Soup+", "hl+": "HL-Soup+", "mehl+": "MEHL-Soup+"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    kmax = max([r["K"] for r in ok] + [2])
    fits = summary.get("memory_fit_bytes", {})
    handles, extrapolated = [], False
    for m in METHODS:
        style = method_style(m)
        colour, marker = style["color"], style["marker"]
        pts = sorted((r["K"], r["peak_memory_bytes"] / 2**30) for r in ok if r["method"] == m)
        if pts:
            ax1.plot([k for k, _ in pts], [v for _, v in pts], "-", marker=marker, color=colour, zorder=3)
            handles.append(Line2D([], [], color=colour, marker=marker, ls="-", label=labels[m]))
        if m in ("learned+", "mehl+") and m in fits and kmax < TARGET_K and pts:
            xs = [pts[-1][0], TARGET_K]
            ax1.plot(xs, [_value_at(fits[m], x) / 2**30 for x in xs], ":", color=colour)
            ax1.plot([TARGET_K], [_value_at(fits[m], TARGET_K) / 2**30], "x", color=colour, ms=8, mew=2)
            extrapolated = True
        tpts = sorted((r["K"], r["seconds_per_epoch"]) for r in ok if r["method"] == m and r.get("seconds_per_epoch"))
        if tpts:
            ax2.plot([k for k, _ in tpts], [v for _, v in tpts], "-", marker=marker, color=colour, zorder=3)
    if extrapolated:
        handles += [Line2D([], [], color="0.3", ls=":", label="least-squares line"),
                    Line2D([], [], color="0.3", marker="x", mew=2, ls="none", label=f"extrapolated to K = {TARGET_K}")]
    tgt = summary.get("targets", {}).get("memory_ratio_K72", {})
    if "value" in tgt:
        kind = "extrapolated" if "EXTRA" in tgt.get("how", "") else "measured"
        ax1.text(0.03, 0.97, f"Learned-Soup+ / MEHL-Soup+ at K = {TARGET_K} ({kind}): {tgt['value']:.1f}x",
                 transform=ax1.transAxes, va="top", fontsize=8,
                 bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    missing = [f"{labels[r['method']]} K = {r['K']}" for r in ok if not r.get("seconds_per_epoch")]
    if missing:
        note = ("no time run for " + ", ".join(missing)
                + " (projected over the memory cap with glibc's default malloc)")
        ax2.text(0.03, 0.97, textwrap.fill(note, 58), transform=ax2.transAxes, va="top", fontsize=7,
                 bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax1.set_ylabel("peak memory above start (GiB)")
    ax1.set_title("peak memory", fontsize=9)
    ax2.set_ylabel("seconds per epoch over the held-out set")
    ax2.set_title("time per epoch (incl. reading checkpoints)", fontsize=9)
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, ScalarFormatter  # noqa: PLC0415

    xticks = sorted({r["K"] for r in ok} | ({TARGET_K} if fits and kmax < TARGET_K else set()))
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(xticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(base=2))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("K (models in the pool)")
        ax.grid(True, which="major", alpha=0.3)
    # headroom above the highest point, so the notes in the upper-left corners cover no data
    for ax in (ax1, ax2):
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * (high / low) ** 0.25)
    fig.suptitle(device_title(title), fontsize=8)
    fig.tight_layout()
    legend_below(fig, handles)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_title(rows: list[dict[str, Any]]) -> str:
    """The figure title of a benchmark, from the setup columns of its CSV rows."""
    first = rows[0]
    mehl = next((r for r in rows if r.get("method") == "mehl+"), first)
    params = first.get("num_parameters")
    size = f" ({params / 1e6:.1f} M parameters)" if isinstance(params, (int, float)) else ""
    return (f"{first.get('arch')} vision tower + {first.get('num_classes')}-class head{size}, "
            f"{first.get('device_name')}, torch {first.get('torch_version')}; MEHL+ b={mehl.get('model_batch_size')}, "
            f"{first.get('inner_iterations')} inner steps per block, batch {first.get('batch_size')}")


def plot_from_csv(csv_path: Path, path: Path) -> Path:
    """Redraw the figure from a benchmark CSV (e.g. the committed data/results/benchmark_cpu.csv) without
    running the benchmark: the fits and ratios are recomputed from its rows (no step timing)."""
    rows = read_rows(csv_path)
    return plot(rows, analyse(rows, None), path, plot_title(rows))
