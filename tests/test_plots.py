"""Figures a reader can trust at a glance: one palette for every figure, a legend in every figure, accuracy axes
from 0 or marked broken, "did not fit" drawn as such, device names in one case. Hand-made tables, no runs."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from soupkit.experiments.ablations import plot_ablations  # noqa: E402
from soupkit.experiments.coefficients import plot_coefficient_histograms, plot_layer_coefficients  # noqa: E402
from soupkit.experiments.plots import (BROKEN_AXIS_GID, DID_NOT_FIT, device_title, family_colours, method_colour,
                                       method_family, plot_main_table, plot_zoo_accuracies, save_figure)
from soupkit.experiments.results import main_table, paper_table  # noqa: E402
from soupkit.experiments.seeds import plot_seed_study, seed_summary  # noqa: E402
from soupkit.experiments.studies import plot_finetuning_cost, plot_heldout_size, plot_top_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _same(a, b) -> bool:
    return np.allclose(to_rgba(a), to_rgba(b))


def _has_legend(fig: plt.Figure) -> bool:
    return bool(fig.legends) or any(ax.get_legend() is not None for ax in fig.axes)


def _honest(ax: plt.Axes, axis: str = "y") -> bool:
    """An accuracy axis that starts at 0, or carries the broken-axis mark."""
    low = (ax.get_ylim() if axis == "y" else ax.get_xlim())[0]
    return low == 0 or any(t.get_gid() == BROKEN_AXIS_GID for t in ax.texts)


def _texts(fig: plt.Figure) -> str:
    return " | ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def _records() -> list[dict]:
    rows = []
    for m, acc in [("best", 0.80), ("uniform", 0.79), ("greedy", 0.81), ("learned+", None), ("hl+", 0.815),
                   ("mehl+", 0.82)]:
        fit = acc is not None
        rows.append({"method": m, "test_accuracy": acc, "heldout_accuracy": acc, "status": "ok" if fit else "did not fit",
                     "memory_cap_mb": 60.0, "seconds_per_epoch": 1.0 if fit else None, "epochs": 5,
                     "seconds_total": 5.0 if fit else None, "peak_memory_bytes": 40 * 2**20 if fit else None,
                     "test_low": acc - 0.01 if fit else None, "test_high": acc + 0.01 if fit else None})
    return rows


def _study(x: str, values: list) -> pd.DataFrame:
    rows = []
    for v in values:
        for m, acc in (("greedy", 0.80), ("mehl+", 0.82)):
            rows.append({"method": m, x: v, "test_accuracy": acc, "test_low": acc - 0.02, "test_high": acc + 0.02,
                         "heldout_accuracy": acc + 0.03})
    return pd.DataFrame(rows)


def test_one_colour_per_family_from_the_palette():
    assert method_family("mehl+released") == method_family("mehl+") == method_family("mehl") == "mehl"
    assert method_family("learned+") == "learned"
    colours = family_colours()
    assert method_colour("mehl+") == method_colour("mehl") == colours["mehl"]
    assert len(set(colours.values())) == len(colours)  # families tell apart


def test_main_table_figure_draws_from_zero_with_paper_legend_and_did_not_fit():
    table = main_table(_records(), paper_table("table2_vitl14", dataset="cifar100"))
    fig = plot_main_table(table, "tiny, cpu")
    acc = fig.axes[0]
    assert acc.get_xlim()[0] == 0  # bar-free dot plot on an axis from 0
    assert fig.legends and DID_NOT_FIT in [t.get_text() for t in fig.legends[0].get_texts()]
    assert "did not fit (memory cap 60 MB)" in _texts(fig)
    assert any(p.get_hatch() for p in acc.patches)  # the hatched row
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "paper" in labels
    # the paper's accuracies are drawn (hollow diamonds)
    assert any(line.get_marker() == "D" and line.get_mfc() == "none" for line in acc.lines)
    mehl_row = list(table["method"]).index("mehl+")
    mehl = [c for c in acc.containers if np.isclose(c.lines[0].get_ydata()[0], mehl_row)]
    assert mehl and _same(mehl[0].lines[0].get_color(), method_colour("mehl+"))
    assert "difference" not in fig.axes[1].get_xlabel() or "−" in fig.axes[1].get_xlabel()
    assert "CPU" in fig._suptitle.get_text() and "cpu" not in fig._suptitle.get_text()


def test_main_table_figure_without_paper_or_reference_still_has_a_legend():
    table = main_table([r for r in _records() if r["method"] != "uniform"])
    fig = plot_main_table(table, "tiny")
    assert _has_legend(fig) and len(fig.axes) == 3  # no reference: no differences panel
    assert fig.axes[0].get_xlim()[0] == 0


def test_same_method_same_colour_in_two_figures():
    table = main_table(_records())
    first = plot_main_table(table, "tiny")
    row = list(table["method"]).index("mehl+")
    main_colour = [c.lines[0].get_color() for c in first.axes[0].containers
                   if np.isclose(c.lines[0].get_ydata()[0], row)][0]
    second = plot_heldout_size(_study("heldout_size", [20, 60]), "tiny")
    line = [ln for ln in second.axes[0].lines if ln.get_label() == "MEHL-Soup+"][0]
    assert _same(line.get_color(), main_colour)


@pytest.mark.parametrize("draw", ["top", "cost", "heldout"])
def test_study_figures_have_legends_and_honest_accuracy_axes(draw):
    if draw == "top":
        records = _study("eliminated", [0, 2]).assign(num_models=lambda f: 8 - f["eliminated"])
        fig = plot_top_models(records, "tiny", paper_table("table3_top_models"))
    elif draw == "cost":
        records = _study("num_finetuned", [2, 4]).assign(finetune_seconds=lambda f: 10.0 * f["num_finetuned"])
        fig = plot_finetuning_cost(records, "tiny", target=0.81)
    else:
        fig = plot_heldout_size(_study("heldout_size", [20, 60]), "tiny cuda")
        assert "GPU" in fig.axes[0].get_title()
    assert _has_legend(fig)
    for ax in fig.axes:
        assert _honest(ax, "y")
        for line in ax.lines:
            if line.get_label() in ("Greedy-Soup", "MEHL-Soup+"):
                method = "greedy" if line.get_label() == "Greedy-Soup" else "mehl+"
                assert _same(line.get_color(), method_colour(method))


def test_zoo_ablation_seed_and_coefficient_figures_use_the_palette_and_a_legend():
    models = pd.DataFrame({"test_acc": np.linspace(0.7, 0.8, 8)})
    fig = plot_zoo_accuracies(models, 0.78, "zoo", 0.6, test_size=500)
    assert _has_legend(fig) and _honest(fig.axes[0], "x")

    table = pd.DataFrame({"study": ["model_batch_size"] * 2, "value": [2, 4], "setting": ["a", "b"],
                          "test_accuracy": [0.8, 0.81], "test_low": [0.78, 0.79], "test_high": [0.82, 0.83],
                          "heldout_accuracy": [0.85, 0.86]})
    fig = plot_ablations(table, "ablations")
    assert _has_legend(fig) and all(_honest(ax) for ax in fig.axes)
    assert _same(fig.axes[0].lines[0].get_color(), method_colour("mehl+"))

    records = pd.DataFrame([{"seed": s, "method": m, "test_accuracy": a + 0.01 * s, "heldout_accuracy": a,
                             "status": "ok"} for s in range(3) for m, a in (("greedy", 0.8), ("mehl+", 0.82))])
    summary = seed_summary(records)
    comparisons = pd.DataFrame({"a": ["mehl+"], "b": ["greedy"], "mean difference (points)": [2.0],
                                "t low (points)": [1.0], "t high (points)": [3.0], "seed 0 (points)": [1.5],
                                "seed 1 (points)": [2.0], "seed 2 (points)": [2.5]})
    fig = plot_seed_study(summary, records, comparisons, "seeds, cpu")
    assert _has_legend(fig) and _honest(fig.axes[0], "x")
    assert "CPU" in fig._suptitle.get_text()

    lam = pd.DataFrame({"method": ["mehl+"] * 4 + ["learned+"] * 4, "model": [0, 1, 2, 3] * 2,
                        "layer": ["w"] * 8, "coefficient": [-0.2, 0.5, 0.4, 0.3, 0.1, 0.2, 0.3, 0.4]})
    fig = plot_coefficient_histograms(lam, "λ")
    assert all(ax.get_legend() is not None for ax in fig.axes)
    assert _same(fig.axes[0].patches[0].get_facecolor()[:3] + (1,), method_colour("mehl+"))
    fig = plot_layer_coefficients(lam, "mehl+", "w")
    bars = fig.axes[0].patches
    assert all(_same(b.get_facecolor(), method_colour("mehl+")) for b in bars)  # red means MEHL-Soup+ only
    assert [bool(b.get_hatch()) for b in bars] == [True, False, False, False]  # outside [0, 1]: a hatch
    assert "outside [0, 1]" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_device_names_in_one_case():
    assert device_title("a, cpu") == "a, CPU"
    assert device_title("torch 2.1+cpu on cuda:0") == "torch 2.1+cpu on GPU"


def test_benchmark_figure_redraws_from_its_csv(tmp_path, monkeypatch):
    # benchmarks/memory_time_plot.py, imported by name as benchmarks/memory_time.py imports it (--plot-only)
    monkeypatch.setattr(sys, "path", [*sys.path, str(ROOT / "benchmarks")])
    bench_plot = importlib.import_module("memory_time_plot")
    seen = {}
    real_close = plt.close

    def keep(fig=None):  # look at the figure before the benchmark closes it
        if fig is not None and not isinstance(fig, str):
            seen["fig"] = fig
        return real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    out = bench_plot.plot_from_csv(ROOT / "data" / "results" / "benchmark_cpu.csv", tmp_path / "b.png")
    assert out == tmp_path / "b.png" and out.stat().st_size > 0
    fig = seen["fig"]
    assert fig.legends  # one legend under the panels: it hides no point
    mehl = [ln for ln in fig.axes[0].lines if ln.get_marker() == "o" and len(ln.get_xdata()) == 5
            and np.ptp(np.log(ln.get_ydata())) < 0.05]  # the flat curve
    assert mehl and _same(mehl[0].get_color(), method_colour("mehl+"))


def test_save_figure_writes_what_savefig_writes_and_leaves_no_temp_file(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([1, 3, 2], label="a")
    ax.legend()
    fig.savefig(tmp_path / "direct.png", dpi=150, bbox_inches="tight", metadata={"Software": None})
    saved = save_figure(fig, tmp_path / "sub" / "figure.png")
    plt.close(fig)
    assert saved.read_bytes() == (tmp_path / "direct.png").read_bytes()
    assert [p.name for p in saved.parent.iterdir()] == ["figure.png"]


def test_run_title_names_the_zoo_its_held_out_images_and_device():
    from soupkit.experiments.plots import run_title

    assert run_title("embedded zoo: 32 ViT fine-tunes on Animal-MNIST", 2000, "cpu") == \
        "Embedded zoo: 32 ViT fine-tunes on Animal-MNIST, 2000 held-out images, CPU"
    assert run_title("model-soups zoo: 72 ViT-B-32-quickgelu fine-tunes on imagenet", None, "cuda:0") == \
        "Model-soups zoo: 72 ViT-B-32-quickgelu fine-tunes on imagenet, all held-out images, GPU"
