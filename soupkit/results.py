"""Result records as files, the paper's reference numbers, and the paper-style tables built from both.

A *record* is one flat dict per soup run (method, accuracies, measured time and memory, zoo, options); runs
write them as JSON lines / CSV and every table or figure is drawn from those files.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from .io import atomic_write_text

__all__ = ["ORDER", "DISPLAY", "PAPER_DIR", "write_csv", "read_csv", "append_jsonl", "read_jsonl",
           "paper_table", "main_table", "ratio", "format_table"]

ORDER = ["best", "uniform", "greedy", "learned", "hl", "mehl", "learned+", "hl+", "mehl+", "ensemble"]
DISPLAY = {
    "best": "Best individual model", "uniform": "Uniform-Soup", "greedy": "Greedy-Soup",
    "learned": "Learned-Soup", "hl": "HL-Soup", "mehl": "MEHL-Soup",
    "learned+": "Learned-Soup+", "hl+": "HL-Soup+", "mehl+": "MEHL-Soup+", "ensemble": "Ensemble",
}
PAPER_DIR = Path(__file__).resolve().parents[1] / "data" / "paper"
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
    """A table of the paper from ``data/paper/<name>.csv`` (e.g. ``"table1_vitb32_imagenet"``); ``dataset``
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


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(ORDER)}
    return frame.sort_values("method", key=lambda s: s.map(lambda m: rank.get(m, len(rank)))).reset_index(drop=True)


def main_table(records: Iterable[Mapping[str, Any]] | pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's table columns for our runs, with the paper's numbers beside them.

    Args:
        records: one per method with ``method``, ``test_accuracy``, ``heldout_accuracy`` (fractions),
            ``seconds_per_epoch``, ``epochs``, ``seconds_total``, ``peak_memory_bytes``; a record with
            ``status: "did not fit"`` (a run stopped by its memory cap) has no accuracy.
        paper: the paper's table (``paper_table(...)``), or None.
    Returns:
        one row per method in the paper's order; accuracies in %, memory in MB (ours) / GB (paper); ``note``
        says "did not fit (> cap MB)" for capped runs, ``paper note`` the paper's ">256" (GB) where it has one.
    """
    ours = pd.DataFrame(list(records)) if not isinstance(records, pd.DataFrame) else records.copy()
    for col in ("seconds_per_epoch", "epochs", "seconds_total", "test_accuracy", "heldout_accuracy"):
        if col not in ours.columns:
            ours[col] = float("nan")
    unfit = ours.get("status", pd.Series("ok", index=ours.index)).eq("did not fit")
    caps = ours.get("memory_cap_mb", pd.Series(float("nan"), index=ours.index))
    table = pd.DataFrame({
        "method": ours["method"],
        "Method": ours["method"].map(DISPLAY),
        "test acc (%)": 100 * ours["test_accuracy"],
        "held-out acc (%)": 100 * ours["heldout_accuracy"],
        "s / epoch": ours["seconds_per_epoch"],
        "#epoch": ours["epochs"],
        "construction (s)": ours["seconds_total"],
        "peak memory (MB)": ours["peak_memory_bytes"] / 2**20,
        "note": [("did not fit (> %g MB)" % cap if pd.notna(cap) else "did not fit (out of memory)") if bad else ""
                 for bad, cap in zip(unfit, caps)],
    })
    for col in ("test acc (%)", "held-out acc (%)", "s / epoch", "#epoch", "construction (s)", "peak memory (MB)"):
        table[col] = pd.to_numeric(table[col], errors="coerce").where(~unfit)
    no_construction = table["method"].isin(["best", "uniform", "ensemble"])  # the paper shows "-" for these
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
    return _ordered(table)


def ratio(records: pd.DataFrame, column: str, numerator: str = "learned+", denominator: str = "mehl+") -> float:
    """``records[column]`` of method ``numerator`` divided by that of ``denominator``."""
    by = records.set_index("method")[column]
    return float(by[numerator] / by[denominator])


def format_table(table: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """Rounded copy for display (and for notebook outputs that must reproduce exactly)."""
    out = table.drop(columns=["method"]).copy()
    for col in out.columns:
        if out[col].dtype.kind == "f":
            out[col] = out[col].round(digits if "acc" in col or "memory" in col else 1)
        if out[col].isna().any():  # "-" as in the paper's tables; object dtype so no float column gets a str
            out[col] = out[col].astype(object).where(out[col].notna(), "-")
    return out
