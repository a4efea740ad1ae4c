"""A multi-seed study of the whole embedded pipeline: S zoos, each with its own seeds, and the soup methods on each.

For each seed ``s`` the embedded zoo is built again with ``search_seed = pretrain_seed = split_seed = s`` (the
hyper-parameter search, the backbone's initialisation and the pre-training / fine-tune / held-out / test split
all change), and the methods run on it with ``RunSpec.seed = s`` (held-out batch order, MEHL's block draw).
Split seed 0 reproduces the committed split file image for image, so seed 0 is the default zoo's recipe.

Files under ``out_dir``::

    seed_<s>/zoo/               the zoo of seed s (soupkit.zoo; with its own split file)
    seed_<s>/<method>.json      one record per method (soupkit.experiments.run.run_method), beside <method>.predictions.csv
    records.csv                 one row per seed x method (seed, method, status, test_accuracy, heldout_accuracy,
                                num_models, seconds_total, record: the JSON path relative to out_dir)

Every comparison then has two intervals: over test images (a paired bootstrap within one seed) and over seeds
(Student's t over the S per-seed values); ``seed_summary`` and ``seed_comparisons`` compute both from the records
file and the predictions files it points to.

    records = seed_study("outputs/seeds", [0, 1, 2], ["greedy", "mehl+"], {"mehl+": {"model_batch_size": 8}})
    seed_comparisons(records, [("mehl+", "greedy")])
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from soupkit.config import MAIN_TABLE_SETTINGS
from soupkit.experiments.results import write_csv
from soupkit.experiments.run import predictions_path, read_correct, run_methods
from soupkit.experiments.stats import paired_difference, seed_interval, verdict
from soupkit.methods.registry import DISPLAY, METHODS
from soupkit.zoo.build import build_zoo, load_zoo
from soupkit.zoo.config import ZooConfig
from soupkit.zoo.embedded_models import ResNetConfig, ViTConfig

__all__ = ["RECORD_COLUMNS", "seed_zoo_config", "seed_dir", "seed_study", "read_seed_records", "seed_zoo_table",
           "seed_summary", "seed_comparisons", "differences_panel", "seed_markers", "plot_seed_study"]

RECORD_COLUMNS = ["seed", "method", "status", "test_accuracy", "heldout_accuracy", "num_models", "seconds_total",
                  "record"]


def seed_zoo_config(seed: int, num_models: int = 32, overrides: Mapping[str, Any] | None = None) -> ZooConfig:
    """The embedded zoo recipe of seed ``seed``: K = ``num_models``, search / pre-training / split seed = ``seed``.

    Args:
        overrides: other ``ZooConfig`` fields (``max_finetune``, ``pretrain_epochs``, ``epoch_choices``...), for
            tests and quick looks; ``model`` may be a ``ModelConfig`` or a dict of ``ViTConfig`` fields; lists
            become tuples.
    """
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(overrides or {}).items()}
    if isinstance(kw.get("model"), Mapping):
        kw["model"] = dataclasses.replace(ViTConfig(), **kw["model"])
    elif "model" in kw and not isinstance(kw["model"], (ViTConfig, ResNetConfig)):
        raise TypeError(f"model override must be a ModelConfig or a dict, got {type(kw['model']).__name__}")
    clash = sorted({"k", "search_seed", "pretrain_seed", "split_seed"} & set(kw))
    if clash:
        raise ValueError(f"{clash} are set by the seed study itself (num_models, seed)")
    return ZooConfig(k=num_models, search_seed=seed, pretrain_seed=seed, split_seed=seed, **kw)


def seed_dir(out_dir: str | os.PathLike, seed: int) -> Path:
    """``<out_dir>/seed_<seed>``: the zoo and the records of one seed."""
    return Path(out_dir) / f"seed_{seed}"


def _zoo_matches(zoo_dir: Path, config: ZooConfig) -> bool:
    """Whether ``zoo_dir`` holds a complete zoo of exactly ``config`` (k included)."""
    try:
        zoo = load_zoo(zoo_dir)
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return False
    same = json.loads(json.dumps(zoo.config.to_dict())) == json.loads(json.dumps(config.to_dict()))
    return same and all((zoo_dir / r["file"]).is_file() for r in zoo.records)


def _record_done(path: Path, method: str, options: Mapping[str, Any], expect: Mapping[str, Any]) -> bool:
    """Whether the record at ``path`` is a finished run of ``method`` with these options and spec fields."""
    if not path.is_file():
        return False
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        return False
    if rec.get("method") != method or json.loads(json.dumps(dict(options))) != rec.get("options"):
        return False
    if any(rec.get(k) != v for k, v in expect.items()):
        return False
    return rec.get("status") != "ok" or predictions_path(path).is_file()


def _row(seed: int, record_path: Path, out_dir: Path) -> dict[str, Any]:
    rec = json.loads(record_path.read_text())
    row = {"seed": seed, **{k: rec.get(k) for k in RECORD_COLUMNS[1:-1]}}
    row["record"] = os.path.relpath(record_path, out_dir)
    return row


def _build_task(zoo_dir: Path, config: ZooConfig, device: str, threads: int | None) -> None:
    """One zoo build (a worker process's task when ``jobs > 1``)."""
    build_zoo(zoo_dir, config, progress=False, device=device, num_threads=threads)


def _methods_task(zoo_dir: Path, folder: Path, todo: list[str], torch_threads: int | None,
                  run_kwargs: dict[str, Any]) -> None:
    """The methods of one seed (a worker process's task when ``jobs > 1``), with ``torch_threads`` threads."""
    if torch_threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(torch_threads)
    run_methods(zoo_dir, folder, todo, progress=False, **run_kwargs)


def _in_parallel(plans: list[dict[str, Any]], jobs: int, device: str, threads: int | None,
                 run_kwargs: dict[str, Any], bar: Any) -> None:
    """Every plan's zoo build, then its methods, in ``jobs`` worker processes (1 / jobs of the cores each). Zoo
    builds are queued first and a seed's methods as soon as its zoo is done, so the workers stay busy."""
    import multiprocessing  # noqa: PLC0415
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait  # noqa: PLC0415

    torch_threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawn: fresh interpreters (no forked torch state); importing soupkit there pins the numerics again
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(_build_task, p["zoo_dir"], p["config"], device, threads): ("zoo", p) for p in plans}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    kind, plan = pending.pop(future)
                    future.result()  # a failure in a worker is raised here
                    if kind == "zoo":
                        task = pool.submit(_methods_task, plan["zoo_dir"], plan["folder"], plan["todo"],
                                           torch_threads, {**run_kwargs, "seed": plan["seed"]})
                        pending[task] = ("methods", plan)
                    else:
                        bar.update(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def seed_study(out_dir: str | os.PathLike, seeds: Sequence[int], methods: Sequence[str],
               options: Mapping[str, Mapping[str, Any]] | None = None, num_models: int = 32,
               heldout_size: int | None = MAIN_TABLE_SETTINGS["heldout_size"], *,
               batch_size: int = MAIN_TABLE_SETTINGS["batch_size"],
               eval_batch_size: int = MAIN_TABLE_SETTINGS["eval_batch_size"],
               zoo_overrides: Mapping[str, Any] | None = None, threads: int | None = 1, jobs: int = 1,
               isolate: bool = False, device: str = "cpu", progress: bool = True) -> pd.DataFrame:
    """Build the zoo of every seed and run ``methods`` on it; write the records and ``<out_dir>/records.csv``.

    Resumable: a seed whose zoo is complete with this recipe and whose records all exist (same method, options,
    held-out size, batch sizes, seed, device and K) is not touched; otherwise the zoo is built or resumed
    (``build_zoo`` reuses a matching zoo folder, and refuses one of another recipe) and only the missing or
    stale records are run again (all of them if the zoo was not complete).

    Args:
        out_dir: study folder (``seed_<s>/zoo``, ``seed_<s>/<method>.json``, ``records.csv``).
        seeds: S seeds; each is the zoo's search, pre-training and split seed and the runs' ``RunSpec.seed``.
        methods: names of ``soupkit.METHODS``.
        options: per-method ``make_soup`` options, ``{method: {...}}`` (``soupkit.experiments.run.soup_options``).
        num_models: K, fine-tunes per zoo.
        heldout_size: held-out images the soups learn on (a class-balanced prefix; None = all).
        zoo_overrides: other ``ZooConfig`` fields for every seed's zoo (see :func:`seed_zoo_config`).
        threads: torch CPU threads while building zoos (fixed, so a build gives the same bytes; None = current).
        jobs: seeds worked on at once. 1: everything in this process, one seed after the other. More: that many
            worker processes (spawned), each with ``cpu_count // jobs`` torch threads for the methods; the zoos
            are the same bytes (``threads`` per build either way) and so are the accuracies.
        isolate: each method in a fresh process (honest peak memory; not needed for accuracies).
        device: torch device for building the zoos and the soups.
        progress: a tqdm bar over seeds.
    Returns:
        the rows of ``records.csv`` (S x len(methods)), with ``record`` as a path that opens from the current
        folder (``out_dir / record``); accuracies are fractions.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = {m: dict((options or {}).get(m, {})) for m in methods}
    expect = {"heldout_size": heldout_size, "batch_size": batch_size, "eval_batch_size": eval_batch_size,
              "device": device, "num_models": num_models}
    run_kwargs = {"isolate": isolate, "options": options, "heldout_size": heldout_size, "batch_size": batch_size,
                  "eval_batch_size": eval_batch_size, "device": device}
    plans = []
    for seed in seeds:
        folder = seed_dir(out, seed)
        config = seed_zoo_config(seed, num_models, zoo_overrides)
        zoo_dir = folder / "zoo"
        # records count only beside a complete zoo of this recipe (else they may be of another zoo)
        zoo_ready = _zoo_matches(zoo_dir, config)
        todo = [m for m in methods if not zoo_ready
                or not _record_done(folder / f"{m}.json", m, options[m], {**expect, "seed": seed})]
        plans.append({"seed": seed, "folder": folder, "zoo_dir": zoo_dir, "config": config, "todo": todo})

    def rows_of(done: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = [_row(p["seed"], p["folder"] / f"{m}.json", out) for p in done for m in methods]
        write_csv(pd.DataFrame(rows, columns=RECORD_COLUMNS), out / "records.csv")
        return rows

    bar = tqdm(total=len(plans), desc="seeds", disable=not progress)
    bar.update(sum(not p["todo"] for p in plans))
    if jobs == 1 or sum(bool(p["todo"]) for p in plans) <= 1:
        for i, plan in enumerate(plans):
            if plan["todo"]:
                bar.set_postfix_str(f"seed {plan['seed']}: zoo")
                build_zoo(plan["zoo_dir"], plan["config"], progress=False, device=device, num_threads=threads)
                bar.set_postfix_str(f"seed {plan['seed']}: {len(plan['todo'])} methods")
                run_methods(plan["zoo_dir"], plan["folder"], plan["todo"], progress=False,
                            **{**run_kwargs, "seed": plan["seed"]})
                bar.update(1)
            rows = rows_of(plans[:i + 1])
    else:
        _in_parallel([p for p in plans if p["todo"]], jobs, device, threads, run_kwargs, bar)
    rows = rows_of(plans)
    bar.close()
    frame = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    frame["record"] = [str(out / r) for r in frame["record"]]
    return frame


def read_seed_records(out_dir: str | os.PathLike) -> pd.DataFrame:
    """``<out_dir>/records.csv`` with ``record`` paths that open from the current folder (``out_dir / record``)."""
    out = Path(out_dir)
    frame = pd.read_csv(out / "records.csv")
    frame["record"] = [str(out / r) for r in frame["record"]]
    return frame


def seed_zoo_table(out_dir: str | os.PathLike, seeds: Sequence[int]) -> pd.DataFrame:
    """One row per seed's zoo: seed, K, linear-probe test accuracy and the fine-tunes' test accuracy
    (min / mean / max), all in %, and the first 12 hex digits of its split file's fingerprint."""
    rows = []
    for seed in seeds:
        zoo = load_zoo(seed_dir(out_dir, seed) / "zoo")
        s = zoo.summary()
        rows.append({"seed": seed, "K": s["k"], "linear probe (%)": 100 * s["lp_test_acc"],
                     "worst fine-tune (%)": 100 * s["finetune_test_min"],
                     "mean fine-tune (%)": 100 * s["finetune_test_mean"],
                     "best fine-tune (%)": 100 * s["finetune_test_max"],
                     "split": str(zoo.info["splits_fingerprint"])[:12]})
    return pd.DataFrame(rows)


def _ok(records: pd.DataFrame) -> pd.DataFrame:
    ok = records[records["test_accuracy"].notna()]
    if "status" in ok:
        ok = ok[ok["status"].fillna("ok") == "ok"]
    return ok


def seed_summary(records: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per method, the test accuracy over seeds: mean with Student's t interval (``stats.seed_interval``).

    Args:
        records: rows of ``records.csv`` (columns seed, method, test_accuracy, heldout_accuracy; accuracies as
            fractions); runs that did not finish (no test accuracy) are left out.
    Returns:
        one row per method, in order of first appearance: ``method``, ``Method`` (display name), ``seeds`` (S),
        ``mean test acc (%)``, ``t low (%)`` / ``t high (%)`` (NaN with fewer than 2 seeds),
        ``t half-width (points)``, ``sd over seeds (points)``, ``min (%)`` / ``max (%)`` over seeds and
        ``mean held-out acc (%)``.
    """
    ok = _ok(records)
    rows = []
    for method in pd.unique(ok["method"]):
        part = ok[ok["method"] == method].sort_values("seed")
        acc = 100 * part["test_accuracy"].to_numpy(dtype=float)
        interval = seed_interval(acc, level) if len(acc) >= 2 else None
        rows.append({
            "method": method, "Method": DISPLAY.get(method, method), "seeds": len(acc),
            "mean test acc (%)": float(acc.mean()),
            "t low (%)": interval.low if interval else np.nan, "t high (%)": interval.high if interval else np.nan,
            "t half-width (points)": interval.half_width if interval else np.nan,
            "sd over seeds (points)": float(acc.std(ddof=1)) if len(acc) >= 2 else np.nan,
            "min (%)": float(acc.min()), "max (%)": float(acc.max()),
            "mean held-out acc (%)": float(100 * part["heldout_accuracy"].astype(float).mean()),
        })
    return pd.DataFrame(rows)


def seed_comparisons(records: pd.DataFrame, pairs: Sequence[tuple[str, str]], level: float = 0.95,
                     n_boot: int = 2000) -> pd.DataFrame:
    """For each pair (a, b): the paired test-accuracy difference a - b per seed, and over seeds.

    Per seed, both methods' per-image correctness (``soupkit.experiments.run.read_correct`` of their records, the same test
    images) gives the difference and its paired-bootstrap interval over images (``stats.paired_difference``,
    bootstrap seed 0). Over the S seeds where both finished: the mean difference with Student's t interval
    (``stats.seed_interval``) and the verdict on a claimed a > b (``stats.verdict``) drawn from that interval.

    Args:
        records: rows of ``records.csv`` with ``record`` paths that open from the current folder
            (``seed_study``'s return value or ``read_seed_records``).
        pairs: ``[(a, b), ...]`` method names; pairs naming a method absent from ``records`` are left out.
    Returns:
        one row per pair, in points (percentage points of test accuracy; positive = a better): ``a``, ``b``,
        ``seeds``, ``mean difference (points)``, ``t low (points)`` / ``t high (points)`` /
        ``t half-width (points)`` (over seeds; NaN with fewer than 2), ``image half-width (points)`` (mean over
        seeds of the per-seed bootstrap half-widths), ``seeds a > b (images)`` (seeds whose image interval
        lies above 0), ``seeds a < b (images)``, ``verdict (a > b)``, then ``seed <s> (points)`` per seed.
    """
    ok = _ok(records)
    present = set(ok["method"])
    rows = []
    for a, b in pairs:
        if a not in present or b not in present:
            continue
        ra = ok[ok["method"] == a].set_index("seed")["record"]
        rb = ok[ok["method"] == b].set_index("seed")["record"]
        seeds = sorted(set(ra.index) & set(rb.index))
        per_seed = [paired_difference(read_correct(ra[s]), read_correct(rb[s]), level, n_boot).scaled(100)
                    for s in seeds]
        diffs = np.array([d.estimate for d in per_seed])
        interval = seed_interval(diffs, level) if len(diffs) >= 2 else None
        row = {
            "a": a, "b": b, "seeds": len(seeds), "mean difference (points)": float(diffs.mean()),
            "t low (points)": interval.low if interval else np.nan,
            "t high (points)": interval.high if interval else np.nan,
            "t half-width (points)": interval.half_width if interval else np.nan,
            "image half-width (points)": float(np.mean([d.half_width for d in per_seed])),
            "seeds a > b (images)": sum(d.low > 0 for d in per_seed),
            "seeds a < b (images)": sum(d.high < 0 for d in per_seed),
            "verdict (a > b)": verdict(interval, +1) if interval else "cannot tell at this scale",
        }
        row.update({f"seed {s} (points)": d.estimate for s, d in zip(seeds, per_seed)})
        rows.append(row)
    return pd.DataFrame(rows)


def differences_panel(ax: plt.Axes, frame: pd.DataFrame, labels: Sequence[str], colours: Sequence[Any],
                      markers: Mapping[int, str]) -> None:
    """One row per row of ``frame`` (columns ``mean difference (points)``, ``t low (points)``,
    ``t high (points)`` and ``seed <s> (points)``: :func:`seed_comparisons` or
    ``claims.study_differences``): the mean with its t interval over seeds and each seed's value (hollow, in
    ``markers[s]``), 0 marked."""
    y = np.arange(len(frame))
    diff = frame["mean difference (points)"]
    err = np.vstack([diff - frame["t low (points)"], frame["t high (points)"] - diff])
    columns = [c for c in frame.columns if c.startswith("seed ") and c.endswith("(points)")]
    for i, (_, row) in enumerate(frame.iterrows()):
        ax.errorbar(diff.iloc[i], i, xerr=np.nan_to_num(err[:, i:i + 1]), fmt="o", color=colours[i], capsize=4,
                    ms=7, zorder=3)
        for c in columns:
            if pd.notna(row[c]):
                seed = int(c.split()[1])
                ax.scatter(row[c], i + 0.25, marker=markers.get(seed, "o"), s=16, facecolors="none",
                           edgecolors=colours[i], alpha=0.9)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, labels)
    ax.set_ylim(len(frame) - 0.5, -0.5)
    ax.set_xlabel("paired test-accuracy difference (points)")
    ax.grid(axis="x", alpha=0.3)


def seed_markers(seeds: Sequence[int]) -> dict[int, str]:
    """One marker per seed (the same in every seed figure)."""
    return dict(zip(sorted(seeds), "os^Dvp*hX<>" * 4))


def plot_seed_study(summary: pd.DataFrame, records: pd.DataFrame, comparisons: pd.DataFrame | None,
                    title: str) -> plt.Figure:
    """Left: per method the mean test accuracy over seeds with its t interval (bars) and each seed's accuracy
    (points); right (when ``comparisons`` has rows): per pair the mean paired difference a - b with its t
    interval and each seed's difference, with 0 marked. Inputs: :func:`seed_summary`, the records, and
    :func:`seed_comparisons`. Methods in their palette colour (:mod:`soupkit.experiments.plots`); the accuracy axis starts
    at 0 when the differences panel is drawn (it shows the gaps), else it is marked broken."""
    from matplotlib.lines import Line2D  # noqa: PLC0415

    from soupkit.experiments.plots import (device_title, legend_below, mark_broken_axis, method_colour, method_style)  # noqa: PLC0415

    panels = 2 if comparisons is not None and len(comparisons) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 0.45 * max(len(summary), 4) + 1.6), squeeze=False)
    ax = axes[0, 0]
    ok = _ok(records)
    seeds = sorted(pd.unique(ok["seed"]))
    markers = seed_markers(seeds)
    y = np.arange(len(summary))
    mean = summary["mean test acc (%)"]
    err = np.vstack([mean - summary["t low (%)"], summary["t high (%)"] - mean])
    for i, method in enumerate(summary["method"]):
        colour = method_colour(method)
        ax.errorbar(mean.iloc[i], i, xerr=np.nan_to_num(err[:, i:i + 1]), fmt=method_style(method)["marker"],
                    color=colour, capsize=4, ms=7, zorder=3)
        part = ok[ok["method"] == method]
        for seed, acc in zip(part["seed"], part["test_accuracy"]):
            ax.scatter(100 * acc, i + 0.25, marker=markers[seed], s=16, facecolors="none", edgecolors=colour,
                       alpha=0.9)
    ax.set_yticks(y, summary["Method"])
    ax.set_ylim(len(summary) - 0.5, -0.5)
    ax.set_xlabel("test accuracy (%)")
    if panels == 2:
        ax.set_xlim(0, 100)
    else:
        mark_broken_axis(ax, "x")
    ax.grid(axis="x", alpha=0.3)
    if panels == 2:
        labels = [f"{DISPLAY.get(a, a)} - {DISPLAY.get(b, b)}" for a, b in zip(comparisons.a, comparisons.b)]
        differences_panel(axes[0, 1], comparisons, labels, [method_colour(a) for a in comparisons["a"]], markers)
    fig.suptitle(device_title(title))
    fig.tight_layout()
    handles = [Line2D([], [], color="0.3", marker="o", ls="-", label="mean, t interval over seeds")]
    handles += [Line2D([], [], color="0.3", marker=markers[s], mfc="none", ls="none", label=f"seed {s}")
                for s in seeds]
    handles += [Line2D([], [], color=method_colour(m), marker="s", ls="none", label=DISPLAY.get(m, m))
                for m in dict.fromkeys(summary["method"])]
    legend_below(fig, handles)
    return fig
