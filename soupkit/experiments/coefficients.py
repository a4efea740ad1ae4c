"""The mixing coefficients of saved soups as a tidy table, their histograms (the paper's Fig. 1) and an explorer.

A soup's weight on model i in layer l is λ_{i,l}: θ_l = Σ_i λ_{i,l} θ_{i,l}. ``SoupResult.coefficients`` already
holds λ (``[K]`` or ``[K, L]``); :func:`coefficients_from_params` recomputes it from the raw learned variables as
a check:

* Learned-Soup(+): λ = softmax over the K models of the logits (always in [0, 1]);
* HL/MEHL-Soup(+), decentralised (the default): θ = θ̄ + Σ_i α_i (θ_i − θ̄), so λ_i = 1/K + α_i − mean(α)
  per layer (sums to 1, any sign: extrapolation);
* HL/MEHL-Soup(+) with ``decentralize=False`` (appendix D): λ = β itself (need not sum to 1).

(The released code's variants ``recenter`` / ``normalize_directions`` move the centre or scale the
directions, so λ cannot be recovered from α alone there: read ``SoupResult.coefficients``.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import Tensor

from soupkit.engine.layers import LayerMap
from soupkit.errors import MissingInputError
from soupkit.methods.registry import DISPLAY
from soupkit.methods.result import SoupResult
from soupkit.pool.checkpoint_pool import CheckpointPool

__all__ = ["load_results", "coefficients_from_params", "coefficient_table", "coefficient_summary", "combine",
           "plot_coefficient_histograms", "plot_layer_coefficients", "coefficient_explorer"]

StateDict = dict[str, Tensor]
ALL_LAYERS = "all layers"


def load_results(directory: str | os.PathLike, methods: Sequence[str]) -> dict[str, SoupResult]:
    """``{method: SoupResult}`` read from ``directory/<method with + as _plus>/`` (notebook 02's layout).

    Raises:
        MissingInputError (a FileNotFoundError): naming the missing methods and the notebook that writes them.
    """
    directory = Path(directory)
    folders = {m: directory / m.replace("+", "_plus") for m in methods}
    missing = [m for m, f in folders.items() if not (f / "result.json").is_file()]
    if missing:
        raise MissingInputError(f"no saved soup for {missing} under {directory}: run notebooks/02_main_table.ipynb "
                                "first (it saves every method's SoupResult there), or set run_missing = True")
    return {m: SoupResult.load(f) for m, f in folders.items()}


def coefficients_from_params(result: SoupResult) -> Tensor:
    """λ recomputed from ``result.params`` (logits, α or β), in the shape of ``result.coefficients``.

    >>> r = SoupResult("mehl", None, torch.zeros(2), params={"alpha": torch.tensor([[0.5], [0.1]])})
    >>> coefficients_from_params(r)  # 1/2 + α − mean(α)
    tensor([0.7000, 0.3000])
    """
    p = result.params
    if "logits" in p:
        lam = torch.softmax(p["logits"].double(), dim=0)
    elif "alpha" in p:
        alpha = p["alpha"].double()
        lam = 1.0 / len(alpha) + alpha - alpha.mean(dim=0, keepdim=True)
    elif "beta" in p:
        lam = p["beta"].double()
    else:
        raise ValueError(f"{result.name!r} has no learned coefficients (params: {sorted(p)})")
    return lam.reshape(result.coefficients.shape).to(result.coefficients.dtype)


def coefficient_table(results: Mapping[str, SoupResult]) -> pd.DataFrame:
    """One row per (method, model, layer): columns ``method, model, layer_index, layer, coefficient`` (λ on θ_i).

    Model-wise soups (coefficients ``[K]``) get one layer named ``"all"``.
    """
    frames = []
    for method, result in results.items():
        lam = result.coefficients.detach().double()
        lam = lam[:, None] if lam.dim() == 1 else lam
        k, n_layers = lam.shape
        names = result.layer_names or ["all"] * n_layers
        frames.append(pd.DataFrame({
            "method": method, "model": [i for i in range(k) for _ in range(n_layers)],
            "layer_index": list(range(n_layers)) * k, "layer": list(names) * k,
            "coefficient": lam.reshape(-1).tolist()}))
    return pd.concat(frames, ignore_index=True)


def coefficient_summary(table: pd.DataFrame, near_zero: float = 0.05) -> pd.DataFrame:
    """Per method: how many λ, their range, the share outside [0, 1] and near zero, and the worst |Σ_i λ − 1|.

    Args:
        table: :func:`coefficient_table`.
        near_zero: |λ| below it counts as "close to zero" (the paper's observation for both methods).
    """
    rows = []
    for method, group in table.groupby("method", sort=False):
        lam = group["coefficient"]
        sums = group.groupby("layer_index")["coefficient"].sum()
        rows.append({"method": method, "coefficients": len(lam), "min": lam.min(), "max": lam.max(),
                     "% < 0": 100 * (lam < 0).mean(), "% > 1": 100 * (lam > 1).mean(),
                     "% outside [0, 1]": 100 * ((lam < 0) | (lam > 1)).mean(),
                     f"% |λ| < {near_zero:g}": 100 * (lam.abs() < near_zero).mean(),
                     "max |Σλ − 1|": (sums - 1).abs().max()})
    return pd.DataFrame(rows)


def combine(pool: CheckpointPool, coefficients: Tensor, layers: LayerMap, dtype: torch.dtype = torch.float64) -> StateDict:
    """θ = Σ_i λ_i θ_i per layer, streamed one model at a time (the soup a set of coefficients describes).

    Follows ``layers.py``: buffers take their layer's λ (the mean over layers for group -1), integer
    tensors come from the first model, aliases of tied tensors are filled in.

    Args:
        coefficients: λ, ``[K]`` (model-wise) or ``[K, L]``.
    """
    lam = coefficients.to(dtype)
    lam = lam[:, None] if lam.dim() == 1 else lam
    lam = torch.cat([lam, lam.mean(dim=1, keepdim=True)], dim=1)  # column -1: buffers without a layer
    total: StateDict = {}
    for i in range(len(pool)):
        state = pool.load(i, dtype=dtype)
        for key in layers.mixed:
            term = lam[i, layers.group[key]] * state[key]
            total[key] = term if i == 0 else total[key] + term
        if i == 0:
            total.update({key: state[key].clone() for key in layers.fixed})
        del state
    return layers.complete(total)


def _label(method: str) -> str:
    return DISPLAY.get(method, method)


def plot_coefficient_histograms(table: pd.DataFrame, title: str, methods: Iterable[str] = ("mehl+", "learned+"),
                                bins: int = 60) -> plt.Figure:
    """Fig. 1: one histogram per method of all its λ (every model and layer), [0, 1] marked."""
    import seaborn as sns  # noqa: PLC0415  (heavy import, only for plots)

    methods = [m for m in methods if m in set(table["method"])]
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 3.8), sharex=True, squeeze=False)
    rows = table[table["method"].isin(methods)]["coefficient"]
    lo, hi = min(rows.min(), 0.0), max(rows.max(), 0.0)
    lo, hi = lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo)
    edges = torch.linspace(lo, hi, bins + 1).tolist()
    from soupkit.experiments.plots import device_title, method_colour  # noqa: PLC0415

    for ax, method in zip(axes[0], methods):
        lam = table.loc[table["method"] == method, "coefficient"]
        sns.histplot(x=lam, bins=edges, ax=ax, color=method_colour(method), stat="count", label=f"λ of {_label(method)}")
        ax.set_yscale("log")
        drawn = [edge for edge in (0.0, 1.0) if lo <= edge <= hi]
        for edge in drawn:
            ax.axvline(edge, color="black", lw=0.8, ls="--",
                       label=(" and ".join(f"λ = {e:g}" for e in drawn)) if edge == drawn[0] else None)
        outside = 100 * ((lam < 0) | (lam > 1)).mean()
        ax.set_title(f"{_label(method)}: {len(lam)} coefficients, {outside:.1f} % outside [0, 1]", fontsize=10)
        ax.set_xlabel("mixing coefficient λ (weight on θ_i)")
        # under the axes: the histogram fills the upper corners on a log scale
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(device_title(title))
    fig.tight_layout()
    return fig


def plot_layer_coefficients(table: pd.DataFrame, method: str, layer: str = ALL_LAYERS, ax: plt.Axes | None = None) -> plt.Figure:
    """λ of one method: per model for one layer (bars), or the histogram over all layers (``layer="all layers"``)."""
    import seaborn as sns  # noqa: PLC0415

    fig = ax.figure if ax is not None else plt.figure(figsize=(8, 3.2))
    ax = ax if ax is not None else fig.add_subplot()
    rows = table[table["method"] == method]
    from matplotlib.patches import Patch  # noqa: PLC0415

    from soupkit.experiments.plots import method_colour  # noqa: PLC0415

    colour = method_colour(method)  # the method's colour, as in every figure; "outside [0, 1]" is a hatch
    if layer == ALL_LAYERS:
        sns.histplot(x=rows["coefficient"], bins=50, ax=ax, color=colour, label=f"λ of {_label(method)}")
        ax.set_xlabel("λ")
        ax.axvline(0, color="black", lw=0.6, label="λ = 0")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        rows = rows[rows["layer"] == layer]
        outside = [v < 0 or v > 1 for v in rows["coefficient"]]
        bars = ax.bar(rows["model"], rows["coefficient"], color=colour, edgecolor="black", lw=0.4)
        for bar, out in zip(bars, outside):
            if out:
                bar.set_hatch("////")
        ax.axhline(1 / max(len(rows), 1), color="gray", lw=0.8, ls=":", label="uniform 1/K")
        ax.set_xlabel("model i")
        ax.set_ylabel("λ")
        ax.axhline(0, color="black", lw=0.6)
        handles = [Patch(facecolor=colour, edgecolor="black", lw=0.4, label=f"λ_i of {_label(method)}")]
        if any(outside):
            handles.append(Patch(facecolor=colour, edgecolor="black", lw=0.4, hatch="////", label="outside [0, 1]"))
        handles += ax.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(f"{_label(method)}, {layer}", fontsize=10)
    return fig


def coefficient_explorer(table: pd.DataFrame):
    """An ipywidgets explorer: pick a method and a layer, the plot of :func:`plot_layer_coefficients` updates.

    Returns the widget (display it), or None when ipywidgets is not installed; without a live front end
    (papermill, nbconvert) only its static state is saved, so draw a static figure beside it.
    """
    try:
        import ipywidgets as widgets  # noqa: PLC0415
    except ImportError:
        return None
    methods = list(dict.fromkeys(table["method"]))
    layers = [ALL_LAYERS] + list(dict.fromkeys(table["layer"]))

    def show(method: str, layer: str) -> None:
        plot_layer_coefficients(table, method, layer)
        plt.show()

    return widgets.interactive(show, method=widgets.Dropdown(options=methods, description="method"),
                               layer=widgets.Dropdown(options=layers, description="layer"))
