"""Check a rerun's result tables against the committed ones within measured tolerances, never digit for digit.

Another CPU (another instruction set, another BLAS, aarch64) builds another zoo, and the soups' accuracies
follow it. So a rerun is compared with the committed ``figures/*.csv`` column by column:

* columns that do not depend on rounding (method names, settings, counts, the paper's numbers) must be equal;
* accuracy columns may differ by at most their tolerance (points) from ``soupkit/experiments/tolerances.csv``, which
  :func:`derive_tolerances` computes from measured spreads (:data:`TOLERANCE_RULE`);
* cost columns (seconds, memory) vary from run to run on one machine and are not compared;
* numeric columns with no measured spread are listed as "not compared", never silently passed.

    python -m soupkit.experiments.drift check figures outputs/figures       # exit 1 naming every number past tolerance
    python -m soupkit.experiments.drift derive --seeds figures/seeds_summary.csv --path-a A --path-b B
"""
from __future__ import annotations

import argparse
from fnmatch import fnmatch
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from soupkit.experiments.runner import EXTRA_TABLES
from soupkit.methods.registry import DISPLAY

__all__ = ["Drift", "describe_tables", "column_kind", "compare_tables", "compare_dirs", "load_tolerances", "derive_tolerances",
           "TOLERANCE_FILE", "TOLERANCE_RULE", "main"]

TOLERANCE_FILE = Path(__file__).resolve().parent / "tolerances.csv"  # package data, written by `drift derive`
TOLERANCE_RULE = ("tolerance of a kind = the larger of 4 x the standard deviation over seeds (pooled over "
                  "methods) and 2 x the largest difference seen between two float paths on this machine, "
                  "rounded up to 0.05 points")

_COST = re.compile(r"s / epoch|construction|memory|seconds|\(s\)|cpu|time|peak|\bMB\b|\bGB\b")
_DIFFERENCE = re.compile(r"change|points|- greedy| − |gap")
_ACCURACY = re.compile(r"acc|\(%\)|accuracy|^test_(low|high)$")
# tables with one accuracy column per method: every registered method's display name
_METHOD_COLUMN = re.compile("|".join(["Soup", "individual", *map(re.escape, DISPLAY.values())]))
_COEFFICIENT = re.compile(r"cosine|λ|\bmin\b|\bmax\b|< 0|> 1|outside")


def column_kind(name: str, values: pd.Series) -> str:
    """``"exact"``, ``"cost"``, ``"accuracy"``, ``"difference"``, ``"statistic"`` or ``"other"`` for a column."""
    if name.startswith("paper") or not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return "exact"
    finite = values.dropna()
    if not len(finite):
        return "exact"  # an empty column stays empty
    if _COST.search(name):
        return "cost"
    if _COEFFICIENT.search(name):
        return "statistic"
    if _DIFFERENCE.search(name):
        return "difference"
    if _ACCURACY.search(name):
        return "accuracy"
    if (finite == finite.round()).all():
        return "exact"  # settings and counts: integers
    if _METHOD_COLUMN.search(name):
        return "accuracy"
    return "other"


@dataclass(frozen=True)
class Drift:
    """One number (or cell) that moved past its tolerance, or a structural difference."""

    file: str
    where: str
    committed: object
    rerun: object
    tolerance: float | None

    def __str__(self) -> str:
        tol = "must be equal" if self.tolerance is None else f"tolerance {self.tolerance:g}"
        return f"{self.file}: {self.where}: committed {self.committed!r}, rerun {self.rerun!r} ({tol})"


def _points(name: str, values: pd.Series) -> pd.Series:
    """Fractions (``test_accuracy`` columns) as points, so one tolerance in points serves every table."""
    return values * 100 if name.endswith("_accuracy") or name in ("test_low", "test_high") else values


def compare_tables(committed: pd.DataFrame, rerun: pd.DataFrame, tolerances: dict[str, float],
                   file: str = "") -> tuple[list[Drift], list[str]]:
    """Compare two versions of one result table.

    Args:
        tolerances: kind -> largest allowed absolute difference (points for accuracies).
    Returns:
        (drifts, columns not compared: costs and kinds without a tolerance).
    """
    drifts: list[Drift] = []
    if list(committed.columns) != list(rerun.columns):
        return [Drift(file, "columns", list(committed.columns), list(rerun.columns), None)], []
    if len(committed) != len(rerun):
        return [Drift(file, "rows", len(committed), len(rerun), None)], []
    label = committed.columns[0]
    skipped = []
    # a run stopped by a memory cap ("did not fit") depends on the process's measured memory, which varies
    # from run to run: such rows are reported as not compared
    if "note" in committed.columns:
        capped = (committed["note"].astype(str).str.contains("did not fit")
                  | rerun["note"].astype(str).str.contains("did not fit")).to_numpy()
        skipped += [f"row {label}={v!r} (capped: whether it fits varies from run to run)"
                    for v in committed[label][capped]]
        committed, rerun = committed[~capped], rerun[~capped]
    for col in committed.columns:
        kind = column_kind(col, committed[col])
        a, b = committed[col], rerun[col]
        if kind == "cost" or (kind != "exact" and kind not in tolerances):
            skipped.append(f"{col} ({kind})")
            continue
        for i in range(len(a)):
            x, y = a.iloc[i], b.iloc[i]
            missing_x, missing_y = pd.isna(x), pd.isna(y)
            where = f"row {i} ({label}={committed[label].iloc[i]!r}), column {col!r}"
            if missing_x or missing_y:
                if missing_x != missing_y:
                    drifts.append(Drift(file, where, x, y, None))
                continue
            if kind == "exact":
                same = math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-9) if isinstance(
                    x, (int, float)) and isinstance(y, (int, float)) else str(x) == str(y)
                if not same:
                    drifts.append(Drift(file, where, x, y, None))
                continue
            tol = tolerances[kind]
            dx = abs(float(_points(col, pd.Series([x])).iloc[0]) - float(_points(col, pd.Series([y])).iloc[0]))
            if dx > tol + 1e-9:
                drifts.append(Drift(file, where, x, y, tol))
    return drifts, skipped


def load_tolerances(path: str | Path = TOLERANCE_FILE) -> dict[str, float]:
    """kind -> tolerance from ``soupkit/experiments/tolerances.csv`` (written by :func:`derive_tolerances`)."""
    table = pd.read_csv(path)
    return dict(zip(table["kind"], table["tolerance"].astype(float)))


def compare_dirs(committed_dir: str | Path, rerun_dir: str | Path, tolerances: dict[str, float] | None = None,
                 exclude: Sequence[str] = ()) -> tuple[list[Drift], dict[str, list[str]]]:
    """Compare every ``*.csv`` of ``committed_dir`` (but those matching a glob of ``exclude``: tables of
    notebooks the rerun did not run) with the same file in ``rerun_dir`` (a missing file is a drift).
    Returns (drifts, {file: columns and rows not compared})."""
    tolerances = load_tolerances() if tolerances is None else tolerances
    committed_dir, rerun_dir = Path(committed_dir), Path(rerun_dir)
    names = sorted(p.name for p in committed_dir.glob("*.csv") if not any(fnmatch(p.name, g) for g in exclude))
    drifts, skipped = [], {}
    for name in names:
        rerun = rerun_dir / name
        if not rerun.is_file():
            drifts.append(Drift(name, "file", "present", "missing", None))
            continue
        found, left = compare_tables(pd.read_csv(committed_dir / name), pd.read_csv(rerun), tolerances, name)
        drifts += found
        if left:
            skipped[name] = left
    return drifts, skipped


def describe_tables(folder: str | os.PathLike, names: Sequence[str]) -> str:
    """Rows and columns of result tables, one line each: what a notebook's outputs must keep on every machine
    (nbval compares this text; the numbers are compared by :func:`compare_dirs` within tolerances)."""
    lines = []
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            lines.append(f"{name}: missing")
            continue
        table = pd.read_csv(path)
        lines.append(f"{name}: {len(table)} rows; columns {list(table.columns)}")
    return "\n".join(lines)


def _ceil(x: float, step: float = 0.05) -> float:
    return round(math.ceil(x / step - 1e-9) * step, 10)


def derive_tolerances(seeds_summary: str | Path | None, path_pairs: Sequence[tuple[str | Path, str | Path]] = (),
                      out: str | Path = TOLERANCE_FILE) -> pd.DataFrame:
    """Write ``soupkit/experiments/tolerances.csv`` from measured spreads (:data:`TOLERANCE_RULE`).

    Args:
        seeds_summary: ``seeds_summary.csv`` of the multi-seed study (columns ``method``,
            ``sd over seeds (points)``):
            the spread of each method's test accuracy over seeds of the whole pipeline.
        path_pairs: folders of result tables from two float paths (e.g. pinned numerics and this machine's
            native kernels): every accuracy-kind and difference-kind column's largest difference.
    """
    rows = []
    seed_sd = float("nan")
    if seeds_summary is not None:
        table = pd.read_csv(seeds_summary)
        seed_sd = float((table["sd over seeds (points)"] ** 2).mean() ** 0.5)
    path_max: dict[str, float] = {}
    for a, b in path_pairs:
        for name in sorted(p.name for p in Path(a).glob("*.csv")):
            if not (Path(b) / name).is_file():
                continue
            ta, tb = pd.read_csv(Path(a) / name), pd.read_csv(Path(b) / name)
            if list(ta.columns) != list(tb.columns) or len(ta) != len(tb):
                continue
            for col in ta.columns:
                kind = column_kind(col, ta[col])
                if kind in ("accuracy", "difference", "statistic"):
                    d = (_points(col, ta[col]) - _points(col, tb[col])).abs().max()
                    if pd.notna(d):
                        path_max[kind] = max(path_max.get(kind, 0.0), float(d))
    # a difference of two accuracies spreads up to twice as far; coefficient statistics have no seed spread
    for kind, factor in (("accuracy", 1.0), ("difference", 2.0), ("statistic", 0.0)):
        seed_part = 4 * factor * seed_sd if not math.isnan(seed_sd) else 0.0
        path_part = 2 * path_max.get(kind, 0.0)
        if seed_part == 0 and kind not in path_max:
            continue  # nothing measured: the kind stays "not compared"
        rows.append({"kind": kind, "tolerance": _ceil(max(seed_part, path_part)),
                     "seed_sd_points": round(seed_sd, 4), "float_path_max_points": round(path_max.get(kind, 0.0), 4),
                     "rule": TOLERANCE_RULE})
    frame = pd.DataFrame(rows)
    frame.to_csv(out, index=False)
    return frame


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soupkit.experiments.drift", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="compare a rerun's tables with the committed ones")
    check.add_argument("committed", help="folder of the committed tables (figures/)")
    check.add_argument("rerun", help="folder of the rerun's tables")
    check.add_argument("--tolerances", default=str(TOLERANCE_FILE))
    check.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                       help="committed tables not to compare (of notebooks the rerun did not run); repeatable")
    check.add_argument("--with-extra", action="store_true",
                       help="also compare the tables of the EXTRA notebooks (runner.EXTRA_TABLES: 10, 12), "
                            "left out by default as `make test` and the default run do not run them")
    derive = sub.add_parser("derive", help="write soupkit/experiments/tolerances.csv from measured spreads")
    derive.add_argument("--seeds", help="seeds_summary.csv of the multi-seed study")
    derive.add_argument("--path-a", action="append", default=[], help="tables of one float path (repeatable)")
    derive.add_argument("--path-b", action="append", default=[], help="the same tables of another float path")
    derive.add_argument("--out", default=str(TOLERANCE_FILE))
    args = parser.parse_args(argv)
    if args.command == "derive":
        print(derive_tolerances(args.seeds, list(zip(args.path_a, args.path_b)), args.out).to_string(index=False))
        return 0
    tolerances = load_tolerances(args.tolerances)
    if not args.with_extra:
        args.exclude += [glob for globs in EXTRA_TABLES.values() for glob in globs]
    drifts, skipped = compare_dirs(args.committed, args.rerun, tolerances, args.exclude)
    compared = sorted(p.name for p in Path(args.committed).glob("*.csv")
                      if not any(fnmatch(p.name, g) for g in args.exclude))
    print(f"compared {len(compared)} tables of {args.committed} with {args.rerun}; tolerances (points): "
          + ", ".join(f"{k} {v:g}" for k, v in tolerances.items()))
    for name, cols in skipped.items():
        print(f"  {name}: not compared: {', '.join(cols)}")
    if drifts:
        print(f"{len(drifts)} number(s) past tolerance or structural differences:")
        for d in drifts:
            print(f"  - {d}")
        return 1
    print("every compared number within tolerance, every structural cell equal")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
