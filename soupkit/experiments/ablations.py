"""MEHL-Soup+ ablations (the paper's Fig. 3, Sec. 4.4, and appendix D): a grid runner, the cosine diagnostic, a plot.

A *study* varies one field of a baseline :class:`Setting` (model mini-batch size b, outer passes over the K
models, inner epochs per block, decentralised directions) and keeps the others; a setting shared by several
studies (the baseline) is run once. Every run is :func:`soupkit.experiments.run.run_method` in this process and
writes its record; the table and the figure are drawn from those records.

Appendix D's diagnostic: the fine-tunes θ_i lie in one basin, so their weight vectors are nearly parallel
(paper: averaged cosine 0.99); the directions θ_i − θ̄ are far less correlated (paper: 0.19).
:func:`cosine_diagnostic` computes both from one K × K Gram matrix per tensor. The paper does not say how it
averaged; note that the directions θ_i − θ̄ sum to zero, which pulls their mean pairwise cosine towards
−1/(K − 1) (exactly that when their norms are equal), so the mean *absolute* cosine is reported as well.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import Tensor

from soupkit.config import HYPERPLANE_DEFAULTS, MAIN_TABLE_SETTINGS
from soupkit.experiments.results import record_test_interval, write_csv
from soupkit.experiments.run import RunSpec, run_method
from soupkit.io import atomic_write_json
from soupkit.methods.registry import METHODS
from soupkit.pool.checkpoint_pool import CheckpointPool
from soupkit.zoo.sources import open_zoo

__all__ = ["STUDIES", "Setting", "ablation_grid", "run_ablations", "gram_matrices",
           "centred_gram", "cosine_matrix", "cosine_diagnostic", "plot_ablations"]

STUDIES = {
    "model_batch_size": "model mini-batch size b",
    "outer_passes": "outer passes over the K models",
    "epochs": "inner epochs per model block",
    "decentralize": "directions",
}


@dataclass(frozen=True)
class Setting:
    """One MEHL-Soup+ configuration of the ablations.

    Attributes:
        model_batch_size: b, models per block (clamped to K).
        outer_passes: passes over all K models; outer iterations = passes × ceil(K / b) blocks.
        epochs: inner epochs over the held-out set per block; None: HL/MEHL's default
            (``soupkit.config.HYPERPLANE_DEFAULTS``).
        decentralize: directions θ_i − θ̄ (True, the paper's method) or θ_i (appendix D).
    """

    model_batch_size: int = MAIN_TABLE_SETTINGS["model_batch_size"]
    outer_passes: int = 1
    epochs: float | None = HYPERPLANE_DEFAULTS.algorithm.epochs
    decentralize: bool = True

    def __post_init__(self) -> None:
        if self.epochs is None:  # resolved here, so that the name and the records say the value run
            object.__setattr__(self, "epochs", HYPERPLANE_DEFAULTS.algorithm.epochs)

    @property
    def name(self) -> str:
        """File stem of the run, e.g. ``b8_passes1_epochs5`` (``_raw`` when not decentralised)."""
        return (f"b{self.model_batch_size}_passes{self.outer_passes}_epochs{self.epochs:g}"
                + ("" if self.decentralize else "_raw"))

    def options(self, num_models: int) -> dict[str, Any]:
        """``make_soup`` options of this setting for a pool of ``num_models``."""
        b = min(self.model_batch_size, num_models)
        return {"model_batch_size": b, "outer_iterations": self.outer_passes * math.ceil(num_models / b),
                "epochs": float(self.epochs), "decentralize": self.decentralize}


def ablation_grid(baseline: Setting, sweeps: Mapping[str, Sequence[Any]]) -> list[tuple[str, Any, Setting]]:
    """``[(study, value, setting)]``: for each study (a field of :class:`Setting`), the baseline with that field
    set to each value. Studies with no values are left out.

    >>> [(s, v, x.name) for s, v, x in ablation_grid(Setting(), {"epochs": [1, 5]})]
    [('epochs', 1, 'b8_passes1_epochs1'), ('epochs', 5, 'b8_passes1_epochs5')]
    """
    unknown = sorted(set(sweeps) - set(STUDIES))
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {list(STUDIES)}")
    return [(study, value, replace(baseline, **{study: value})) for study, values in sweeps.items() for value in values]


def run_ablations(zoo_dir: str | os.PathLike, out_dir: str | os.PathLike, grid: Iterable[tuple[str, Any, Setting]],
                  *, method: str = "mehl+", lr: float | None = None, weight_decay: float | None = None,
                  **spec_fields: Any) -> pd.DataFrame:
    """Run every distinct setting of ``grid`` once (in this process) and tabulate the studies.

    Writes ``<out_dir>/<setting.name>.json`` (the record of :func:`run_method` plus ``cpu_seconds``, the
    process CPU time of the run including loading and evaluation) and ``<out_dir>/ablations.csv``.

    Args:
        grid: :func:`ablation_grid` rows.
        lr, weight_decay: AdamW's; None: ``method``'s default.
        **spec_fields: other :class:`RunSpec` fields (``heldout_size``, ``models``, ``batch_size``, ``seed``...).

    Returns:
        One row per (study, value): the setting's fields, ``outer_iterations``, accuracies as fractions,
        ``test_low`` / ``test_high`` (the 95 % percentile-bootstrap interval of ``test_accuracy`` over test
        images, from the predictions kept beside the record: :func:`soupkit.experiments.results.record_test_interval`; NaN
        when there are none), ``heldout_passes`` (epochs over the held-out set in all), ``seconds_total``,
        ``cpu_seconds`` and ``record_path``.
    """
    grid = list(grid)
    out = Path(out_dir)
    defaults = METHODS[method].defaults
    lr = defaults.algorithm.lr if lr is None else lr
    weight_decay = defaults.algorithm.weight_decay if weight_decay is None else weight_decay
    models = spec_fields.get("models")
    k = len(models) if models is not None else len(open_zoo(zoo_dir).records)
    records: dict[Setting, dict[str, Any]] = {}
    intervals: dict[Setting, tuple[float, float]] = {}
    for _, _, setting in grid:
        if setting in records:
            continue
        spec = RunSpec(zoo_dir=str(zoo_dir), method=method, record=str(out / f"{setting.name}.json"),
                       options={"lr": lr, "weight_decay": weight_decay, **setting.options(k)}, **spec_fields)
        start = time.process_time()
        record = run_method(spec)
        record["cpu_seconds"] = time.process_time() - start
        atomic_write_json(spec.record, record)
        records[setting] = record
        interval = record_test_interval(record, spec.record)
        intervals[setting] = (interval.low, interval.high) if interval else (math.nan, math.nan)
    rows = [{"study": study, "value": value, "setting": setting.name, **asdict(setting),
             "outer_iterations": records[setting]["outer_iterations"],
             "test_accuracy": records[setting]["test_accuracy"],
             "test_low": intervals[setting][0], "test_high": intervals[setting][1],
             "heldout_accuracy": records[setting]["heldout_accuracy"],
             "heldout_passes": records[setting]["epochs"], "seconds_total": records[setting]["seconds_total"],
             "cpu_seconds": records[setting]["cpu_seconds"], "record_path": str(out / f"{setting.name}.json")}
            for study, value, setting in grid]
    table = pd.DataFrame(rows)
    write_csv(table, out / "ablations.csv")
    return table


# ---- appendix D: cosine similarity of θ_i and of θ_i − θ̄ ------------------------------------------------
def gram_matrices(pool: CheckpointPool, keys: Iterable[str] | None = None, max_numel: int | None = None) -> dict[str, Tensor]:
    """``{key: G [K, K]}`` with G_ij = ⟨θ_i[key], θ_j[key]⟩ (float64), for the floating tensors (or ``keys``).

    Memory: the K models' tensors of one chunk of keys (all keys at once when ``max_numel`` is None; else
    chunks of at most ``max_numel`` elements per model, each chunk one more pass over the pool).
    """
    keys = [k for k in (keys if keys is not None else pool.spec) if pool.spec[k].dtype.is_floating_point]
    chunks: list[list[str]] = [[]]
    for key in keys:
        size = math.prod(pool.spec[key].shape)
        if chunks[-1] and max_numel is not None and sum(math.prod(pool.spec[c].shape) for c in chunks[-1]) + size > max_numel:
            chunks.append([])
        chunks[-1].append(key)
    grams = {}
    for chunk in chunks:
        stack = pool.load_stack(range(len(pool)), keys=chunk)
        for key in chunk:
            flat = stack[key].reshape(len(pool), -1).double()
            grams[key] = flat @ flat.T
        del stack
    return grams


def centred_gram(gram: Tensor) -> Tensor:
    """Gram matrix of θ_i − θ̄ (θ̄ the mean of the K models) from that of θ_i: (I − 11ᵀ/K) G (I − 11ᵀ/K)."""
    k = len(gram)
    j = torch.eye(k, dtype=gram.dtype) - 1.0 / k
    return j @ gram @ j


def cosine_matrix(gram: Tensor) -> Tensor:
    """Cosines from a Gram matrix; rows/columns of zero vectors are NaN."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    return gram / (norms[:, None] * norms[None, :])


def _mean_pairs(cos: Tensor) -> tuple[float, float]:
    """Mean over pairs i ≠ j of cos and of |cos| (NaN pairs ignored)."""
    off = cos[~torch.eye(len(cos), dtype=torch.bool)]
    off = off[~off.isnan()]
    return off.mean().item(), off.abs().mean().item()


def _changed(gram: Tensor, rtol: float = 1e-12) -> bool:
    """Whether the K tensors differ beyond the rounding of the Gram matrix (e.g. a bias no fine-tune moved)."""
    return bool(centred_gram(gram).diagonal().max() > rtol * gram.diagonal().max())


def cosine_diagnostic(pool: CheckpointPool, keys: Iterable[str] | None = None, max_numel: int | None = None) -> pd.DataFrame:
    """Averaged pairwise cosine similarity of the weight vectors θ_i and of the directions θ_i − θ̄.

    Returns one row per (vectors, scope): ``vectors`` "θ_i" or "θ_i − θ̄"; ``scope`` "whole model" (all
    floating tensors concatenated) or "per tensor" (the mean over tensors of each tensor's pairwise mean;
    tensors no fine-tune changed are skipped); ``mean_cosine`` and ``mean_abs_cosine`` over
    pairs i ≠ j.
    """
    grams = gram_matrices(pool, keys, max_numel)
    rows = []
    for vectors, transform in (("θ_i", lambda g: g), ("θ_i − θ̄", centred_gram)):
        whole = _mean_pairs(cosine_matrix(transform(sum(grams.values()))))
        per = [_mean_pairs(cosine_matrix(transform(g))) for g in grams.values() if _changed(g)]
        rows.append({"vectors": vectors, "scope": "whole model", "mean_cosine": whole[0], "mean_abs_cosine": whole[1]})
        rows.append({"vectors": vectors, "scope": "per tensor", "mean_cosine": sum(p[0] for p in per) / len(per),
                     "mean_abs_cosine": sum(p[1] for p in per) / len(per)})
    return pd.DataFrame(rows)


# ---- figure --------------------------------------------------------------------------------------------
def plot_ablations(table: pd.DataFrame, title: str, baseline: Setting | None = None) -> plt.Figure:
    """One panel per study of :func:`run_ablations`'s table: test (solid) and held-out (dashed) accuracy, %.

    Test accuracies carry error bars: their 95 % interval over test images (the table's ``test_low`` /
    ``test_high``, where present). The baseline's point (if given) is circled in every panel. Lines in
    MEHL-Soup+'s colour; the accuracy axis is zoomed and marked broken; one legend under the panels.
    """
    from soupkit.experiments.plots import device_title, legend_below, mark_broken_axis, method_colour  # noqa: PLC0415

    colour = method_colour("mehl+")  # every ablation is of MEHL-Soup+
    studies = [s for s in STUDIES if s in set(table["study"])]
    fig, axes = plt.subplots(1, len(studies), figsize=(3.6 * len(studies), 3.4), sharey=True, squeeze=False)
    for ax, study in zip(axes[0], studies):
        rows = table[table["study"] == study]
        if study == "decentralize":
            # a table read back from CSV holds "True" / "False" strings, and bool("False") is True
            x = ["θ_i − θ̄" if str(v).strip().lower() in ("true", "1", "1.0") else "θ_i" for v in rows["value"]]
        else:
            x = rows["value"].astype(float).tolist()
        test = 100 * pd.to_numeric(rows["test_accuracy"], errors="coerce")
        ax.plot(x, test, "o-", color=colour, label="test")
        if "test_low" in rows and "test_high" in rows:
            low, high = (100 * pd.to_numeric(rows[c], errors="coerce") for c in ("test_low", "test_high"))
            has = (low.notna() & high.notna()).to_numpy()
            if has.any():
                ax.errorbar([v for v, h in zip(x, has) if h], test[has], fmt="none", ecolor=colour, capsize=4,
                            yerr=[(test - low)[has], (high - test)[has]],
                            label="test, 95 % interval" if ax is axes[0][0] else None)
        ax.plot(x, 100 * rows["heldout_accuracy"], "s--", color=colour, mfc="white", alpha=0.7, label="held-out")
        if baseline is not None:
            base = rows[rows["setting"] == baseline.name]
            bx = [x[i] for i, flag in enumerate(rows["setting"] == baseline.name) if flag]
            ax.plot(bx, 100 * base["test_accuracy"], "o", ms=12, mfc="none", color="black", label="baseline")
        if study == "decentralize":
            ax.margins(x=0.3)
        if study == "model_batch_size":
            ax.set_xscale("log", base=2)
        if study != "decentralize":
            ax.set_xticks(x, [f"{v:g}" for v in x])
            ax.minorticks_off()
        ax.set_xlabel(STUDIES[study])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    for ax in axes[0]:
        mark_broken_axis(ax, "y")
        if ax is not axes[0][0]:
            ax.set_ylabel("")
    fig.suptitle(device_title(title))
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_below(fig, [h for h, lab in zip(handles, labels) if lab and not lab.startswith("_")])
    return fig
