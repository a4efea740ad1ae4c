"""Result records as files, the paper's reference numbers, and the paper-style tables built from both.

A *record* is one flat dict per soup run (method, accuracies, measured time and memory, zoo, options); runs
write them as JSON lines / CSV and every table or figure is drawn from those files.

Test accuracies carry their 95 % interval over test images: the percentile bootstrap
(:func:`soupkit.experiments.stats.bootstrap_accuracy`) of the per-image correctness kept beside each record
(``x.predictions.csv`` beside ``x.json``, :func:`soupkit.experiments.run.read_correct`), as ``test_low`` /
``test_high`` (fractions) in records and ``test low (%)`` / ``test high (%)`` in the tables.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from soupkit.experiments.stats import Interval, bootstrap_accuracy, mean_over_sets, wilson_interval
from soupkit.io import atomic_write_text
from soupkit.methods.registry import DISPLAY, METHODS, table_order

__all__ = ["PAPER_DIR", "write_csv", "read_csv", "append_jsonl", "read_jsonl",
           "paper_table", "record_test_interval", "with_test_intervals", "with_wilson_intervals", "main_table",
           "shift_names", "shift_table", "ratio", "format_table"]

PAPER_DIR = Path(__file__).resolve().parent / "paper"  # package data: the paper's tables as CSV
_PAPER_NOTES = {"cpu": "memory in CPU RAM", ">256": "did not fit (> 256 GB)"}


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``frame`` as CSV atomically."""
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return atomic_write_text(path, buf.getvalue())


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(path)


def append_jsonl(record: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Append one record to a JSON-lines file, rewriting it atomically (small files: simple and safe)."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    lines.append(json.dumps(record, sort_keys=True, default=str))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def paper_table(name: str, data_dir: str | os.PathLike | None = None, dataset: str | None = None) -> pd.DataFrame:
    """A table of the paper from ``soupkit/experiments/paper/<name>.csv`` (e.g. ``"table1_vitb32_imagenet"``); ``dataset``
    keeps the rows of one data set of a table with a ``dataset`` column (``"table2_vitl14"``: cifar10,
    cifar100, imagenet)."""
    table = pd.read_csv(Path(data_dir or PAPER_DIR) / f"{name}.csv")
    if dataset is None:
        return table
    if "dataset" not in table.columns:
        raise ValueError(f"paper table {name!r} has no dataset column")
    if dataset not in set(table["dataset"]):
        raise ValueError(f"paper table {name!r} has no rows for {dataset!r}; it has {sorted(set(table['dataset']))}")
    return table[table["dataset"] == dataset].drop(columns="dataset").reset_index(drop=True)


def _record_path(row: Mapping[str, Any], record_dir: str | os.PathLike | None) -> Path | None:
    """The record file of ``row``: its ``record_path`` if it has one, else ``<record_dir>/<method>.json`` (the
    layout of :func:`soupkit.experiments.run.run_methods`), else None."""
    path = row.get("record_path")
    if isinstance(path, (str, os.PathLike)) and str(path):
        return Path(path)
    if record_dir is not None and isinstance(row.get("method"), str):
        return Path(record_dir) / f"{row['method']}.json"
    return None


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def record_test_interval(record: Mapping[str, Any], record_path: str | os.PathLike | None = None,
                         level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval | None:
    """Test accuracy of one run with its percentile-bootstrap interval over the test images (fractions).

    The per-image correctness is read from the predictions file of ``record_path`` (default: the record's own
    ``record_path`` entry). None when there is nothing to bootstrap: a run that did not fit, no record path,
    no predictions file (records written before predictions were kept), or a predictions file that does not
    match the record (another number of images than ``test_images``, or another accuracy than
    ``test_accuracy``: a stale file; a warning says so).
    """
    from soupkit.experiments.run import predictions_path, read_correct  # noqa: PLC0415  (experiment imports torch)

    if record.get("status") in ("did not fit", "diverged") or _missing(record.get("test_accuracy")):
        return None
    path = Path(record_path) if record_path is not None else _record_path(record, None)
    if path is None or not predictions_path(path).is_file():
        return None
    correct = read_correct(path)
    n, acc = record.get("test_images"), float(record["test_accuracy"])
    if (not _missing(n) and int(n) != correct.size) or abs(correct.mean() - acc) > 0.5 / correct.size:
        warnings.warn(f"{predictions_path(path)}: {correct.size} predictions with accuracy {correct.mean():.6f} do "
                      f"not match the record ({n} images, accuracy {acc:.6f}); no interval for it", stacklevel=2)
        return None
    return bootstrap_accuracy(correct, level=level, n_boot=n_boot, seed=seed)


def with_test_intervals(records: Iterable[Mapping[str, Any]] | pd.DataFrame,
                        record_dir: str | os.PathLike | None = None, level: float = 0.95) -> pd.DataFrame:
    """``records`` as a frame with ``test_low`` and ``test_high`` (fractions): the bootstrap interval over test
    images of each row's ``test_accuracy`` (:func:`record_test_interval`).

    A row's record file is its ``record_path`` column, else ``<record_dir>/<method>.json``. Rows that already
    have both bounds keep them (e.g. a ``records.csv`` written by a study); rows with nothing to bootstrap get
    NaN.
    """
    frame = pd.DataFrame(list(records)) if not isinstance(records, pd.DataFrame) else records.copy()
    lows, highs = [], []
    for _, row in frame.iterrows():
        have = row.get("test_low"), row.get("test_high")
        if not _missing(have[0]) and not _missing(have[1]):
            lows.append(float(have[0]))
            highs.append(float(have[1]))
            continue
        row = row.to_dict()
        path = _record_path(row, record_dir)
        interval = record_test_interval(row, path, level=level) if path is not None else None
        lows.append(interval.low if interval else float("nan"))
        highs.append(interval.high if interval else float("nan"))
    frame["test_low"] = np.asarray(lows, dtype=float)
    frame["test_high"] = np.asarray(highs, dtype=float)
    return frame


def with_wilson_intervals(table: pd.DataFrame, n: int | None, column: str = "test_acc",
                          level: float = 0.95) -> pd.DataFrame:
    """``table`` with ``<column>_low`` and ``<column>_high``: the Wilson interval
    (:func:`soupkit.experiments.stats.wilson_interval`) of each accuracy ``table[column]`` (fractions) measured on ``n``
    test images -- for results with no per-image predictions, such as the zoo's fine-tunes
    (:func:`soupkit.experiments.run.zoo_table`). ``n`` None: the table unchanged."""
    out = table.copy()
    if n is None:
        return out
    bounds = [wilson_interval(a, n, level) if pd.notna(a) else None for a in out[column]]
    out[f"{column}_low"] = [b.low if b else float("nan") for b in bounds]
    out[f"{column}_high"] = [b.high if b else float("nan") for b in bounds]
    return out


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(table_order())}
    return frame.sort_values("method", key=lambda s: s.map(lambda m: rank.get(m, len(rank)))).reset_index(drop=True)


def main_table(records: Iterable[Mapping[str, Any]] | pd.DataFrame, paper: pd.DataFrame | None = None,
               record_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """The paper's table columns for our runs, with the paper's numbers beside them.

    ``test low (%)`` / ``test high (%)`` bound the 95 % percentile-bootstrap interval of ``test acc (%)`` over
    the test images (2000 resamples of the per-image correctness in the record's predictions file, seed 0:
    :func:`with_test_intervals`); NaN for rows with no predictions (runs that did not fit, older records).

    Args:
        records: one per method with ``method``, ``test_accuracy``, ``heldout_accuracy`` (fractions),
            ``seconds_per_epoch``, ``epochs``, ``seconds_total``, ``peak_memory_bytes``; a record with
            ``status: "did not fit"`` (a run stopped by its memory cap) has no accuracy. A ``record_path``
            (or ``test_low`` / ``test_high``) entry locates the predictions of a record.
        paper: the paper's table (``paper_table(...)``), or None.
        record_dir: where records without a ``record_path`` are, as ``<record_dir>/<method>.json`` (the
            ``out_dir`` of :func:`soupkit.experiments.run.run_methods`); None: only ``record_path`` is used.
    Returns:
        one row per method in the paper's order; accuracies in %, memory in MB (ours) / GB (paper); ``note``
        says "did not fit (> cap MB)" for capped runs, ``paper note`` the paper's ">256" (GB) where it has one.
    """
    ours = with_test_intervals(records, record_dir)
    for col in ("seconds_per_epoch", "epochs", "seconds_total", "test_accuracy", "heldout_accuracy"):
        if col not in ours.columns:
            ours[col] = float("nan")
    status = ours.get("status", pd.Series("ok", index=ours.index)).fillna("ok")
    unfit = status.isin(["did not fit", "diverged"])
    caps = ours.get("memory_cap_mb", pd.Series(float("nan"), index=ours.index))
    table = pd.DataFrame({
        "method": ours["method"],
        "Method": ours["method"].map(DISPLAY),
        "test acc (%)": 100 * ours["test_accuracy"],
        "test low (%)": 100 * ours["test_low"],
        "test high (%)": 100 * ours["test_high"],
        "held-out acc (%)": 100 * ours["heldout_accuracy"],
        "s / epoch": ours["seconds_per_epoch"],
        "#epoch": ours["epochs"],
        "construction (s)": ours["seconds_total"],
        "peak memory (MB)": ours["peak_memory_bytes"] / 2**20,
        "note": ["no pretrained model (θ_0): none known for this zoo" if st == "no pretrained model" else
                 "diverged (non-finite loss)" if st == "diverged" else
                 ("did not fit (> %g MB)" % cap if pd.notna(cap) else "did not fit (out of memory)") if bad else ""
                 for bad, cap, st in zip(unfit, caps, status)],
    })
    for col in ("test acc (%)", "test low (%)", "test high (%)", "held-out acc (%)", "s / epoch", "#epoch", "construction (s)", "peak memory (MB)"):
        table[col] = pd.to_numeric(table[col], errors="coerce").where(~unfit)
    # the paper shows "-" for methods with nothing to construct (best, uniform, ensemble)
    no_construction = ~table["method"].map(lambda m: METHODS[m].constructs if m in METHODS else True).astype(bool)
    table.loc[no_construction, ["s / epoch", "#epoch", "construction (s)", "peak memory (MB)"]] = float("nan")
    if paper is not None:
        p = paper.rename(columns={"test_accuracy": "paper acc (%)", "seconds_per_epoch": "paper s / epoch",
                                  "epochs": "paper #epoch", "seconds_total": "paper construction (s)",
                                  "peak_memory_gb": "paper memory (GB)", "memory_note": "paper note"})
        keep = ["method", "paper acc (%)", "paper s / epoch", "paper #epoch", "paper construction (s)",
                "paper memory (GB)"]
        if "paper note" in p.columns:
            p["paper note"] = p["paper note"].map(_PAPER_NOTES.get).fillna("")
            keep.append("paper note")
        table = table.merge(p[keep], on="method", how="left")
    shifts = shift_table(ours, record_dir)
    if shifts is not None:  # the zoo's distribution shifts: their average beside the in-distribution accuracy
        table = table.merge(shifts[["method", "shift avg (%)", "shift avg low (%)", "shift avg high (%)"]],
                            on="method", how="left")
    return _ordered(table)


_SHIFT_KEY = re.compile(r"^shift_(.+)_accuracy$")


def shift_names(records: pd.DataFrame) -> list[str]:
    """The shifts the records were evaluated on (``shift_<name>_accuracy`` columns, in column order)."""
    return [m.group(1) for m in map(_SHIFT_KEY.match, map(str, records.columns)) if m]


def shift_table(records: Iterable[Mapping[str, Any]] | pd.DataFrame,
                record_dir: str | os.PathLike | None = None, level: float = 0.95) -> pd.DataFrame | None:
    """Accuracy on each distribution shift and their average beside the in-distribution test accuracy, each with
    its 95 % percentile-bootstrap interval over the images (``test low/high (%)``, ``<shift> low/high (%)``;
    the average: :func:`soupkit.experiments.stats.mean_over_sets`, each shift's images resampled on their own).

    Args:
        records: run records with ``shift_<name>_accuracy`` fields (``RunSpec(shifts=True)``) and, to locate the
            per-image predictions, ``record_path`` or ``record_dir`` as for :func:`main_table`.
    Returns:
        one row per method (accuracies in %, NaN for runs with no accuracy or no predictions), or None when no
        record was evaluated on shifts.
    """
    from soupkit.experiments.run import predictions_path, read_correct  # noqa: PLC0415  (experiment imports torch)

    ours = with_test_intervals(records, record_dir, level)
    names = shift_names(ours)
    if not names:
        return None
    rows = []
    for _, row in ours.iterrows():
        row = row.to_dict()
        out: dict[str, Any] = {"method": row["method"], "Method": DISPLAY.get(row["method"], row["method"]),
                               "test acc (%)": float("nan") if _missing(row.get("test_accuracy"))
                               else 100 * float(row["test_accuracy"]),
                               "test low (%)": 100 * row["test_low"], "test high (%)": 100 * row["test_high"]}
        path = _record_path(row, record_dir)
        sets = []
        for name in names:
            acc = row.get(f"shift_{name}_accuracy")
            have = (path is not None and not _missing(acc)
                    and predictions_path(path, f"shift-{name}").is_file())
            correct = read_correct(path, f"shift-{name}") if have else None
            iv = bootstrap_accuracy(correct, level=level) if correct is not None else None
            out[f"{name} acc (%)"] = 100 * float(acc) if not _missing(acc) else float("nan")
            out[f"{name} low (%)"] = 100 * iv.low if iv else float("nan")
            out[f"{name} high (%)"] = 100 * iv.high if iv else float("nan")
            sets.append(correct)
        avg = mean_over_sets(sets, level=level) if all(c is not None for c in sets) else None
        out["shift avg (%)"] = 100 * avg.estimate if avg else float("nan")
        out["shift avg low (%)"] = 100 * avg.low if avg else float("nan")
        out["shift avg high (%)"] = 100 * avg.high if avg else float("nan")
        rows.append(out)
    return _ordered(pd.DataFrame(rows))


def ratio(records: pd.DataFrame, column: str, numerator: str = "learned+", denominator: str = "mehl+") -> float:
    """``records[column]`` of method ``numerator`` divided by that of ``denominator``."""
    by = records.set_index("method")[column]
    return float(by[numerator] / by[denominator])


def _is_accuracy(column: str) -> bool:
    """An accuracy column or a bound of one: every ``(%)`` column (``test low (%)``, ``Greedy-Soup test (%)``)."""
    return "acc" in column or column.endswith("(%)")


def format_table(table: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """Rounded copy for display (and for notebook outputs that must reproduce exactly)."""
    out = table.drop(columns=["method"]).copy()
    for col in out.columns:
        if out[col].dtype.kind == "f":
            out[col] = out[col].round(digits if _is_accuracy(col) or "memory" in col else 1)
        if out[col].isna().any():  # "-" as in the paper's tables; object dtype so no float column gets a str
            out[col] = out[col].astype(object).where(out[col].notna(), "-")
    return out
