"""The result tables of README.md and docs/*.md, generated from the committed result files (never typed in).

The documents hold blocks between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``; this module renders
each from ``figures/*.csv``, ``data/results/*`` and the drift tolerances, and a test checks that every document's copy is the rendered one.

    python -m soupkit.experiments.report --write     # refresh the generated blocks after `make update-committed`
    python -m soupkit.experiments.report --check     # exit 1 when a block differs from what the files give

Both read and write the repository at ``--root`` (default: the current folder).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from soupkit.experiments.drift import TOLERANCE_FILE
from soupkit.experiments.stats import NO_VERDICT, VERDICTS

__all__ = ["BLOCKS", "DOCUMENTS", "render", "update_readme", "update_documents", "main"]


Root = str | os.PathLike  # the repository whose README.md, docs/, figures/ and data/ are read


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if pd.isna(x) else f"{x:.{digits}f}"


def _ci(est: float, low: float, high: float, digits: int = 2, signed: bool = False) -> str:
    if pd.isna(est):
        return "-"
    f = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")
    return f"{f(est)} [{f(low)}, {f(high)}]" if pd.notna(low) else f(est)


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main_table_block(figures: Path, data: Path) -> str:
    t = pd.read_csv(figures / "main_table.csv")
    rows = [[r["Method"], _ci(r["test acc (%)"], r["test low (%)"], r["test high (%)"]),
             _fmt(r["held-out acc (%)"]), _fmt(r["#epoch"], 0), _fmt(r["construction (s)"], 1),
             _fmt(r["peak memory (MB)"], 1), r["note"] if isinstance(r["note"], str) else "",
             _fmt(r["paper acc (%)"])] for _, r in t.iterrows()]
    return _table(["Method", "test acc (%) [95 % CI, test images]", "held-out acc (%)", "#epoch",
                   "construction (s)", "peak memory (MB)", "note", "paper acc (%)"], rows)


def shifts_block(figures: Path, data: Path) -> str:
    t = pd.read_csv(figures / "shift_table.csv")
    shifts = [c[: -len(" acc (%)")] for c in t.columns
              if c.endswith(" acc (%)") and c != "test acc (%)" and not c.startswith("shift avg")]
    rows = [[r["Method"], _ci(r["test acc (%)"], r["test low (%)"], r["test high (%)"]),
             *(_ci(r[f"{s} acc (%)"], r[f"{s} low (%)"], r[f"{s} high (%)"]) for s in shifts),
             _ci(r["shift avg (%)"], r["shift avg low (%)"], r["shift avg high (%)"])] for _, r in t.iterrows()]
    return _table(["Method", "test acc (%) [95 % CI]", *(f"{s} (%) [95 % CI]" for s in shifts),
                   "shift average (%) [95 % CI]"], rows)


def seeds_block(figures: Path, data: Path) -> str:
    t = pd.read_csv(figures / "seeds_summary.csv")
    rows = [[r["Method"], int(r["seeds"]), _ci(r["mean test acc (%)"], r["t low (%)"], r["t high (%)"]),
             _fmt(r["sd over seeds (points)"]), f"{_fmt(r['min (%)'])}-{_fmt(r['max (%)'])}"] for _, r in t.iterrows()]
    return _table(["Method", "seeds", "mean test acc (%) [95 % t CI over seeds]", "sd over seeds (points)",
                   "range (%)"], rows)


def seed_comparisons_block(figures: Path, data: Path) -> str:
    from soupkit.methods.registry import DISPLAY  # noqa: PLC0415

    t = pd.read_csv(figures / "seeds_comparisons.csv")
    rows = [[f"{DISPLAY.get(r['a'], r['a'])} − {DISPLAY.get(r['b'], r['b'])}", int(r["seeds"]),
             _ci(r["mean difference (points)"], r["t low (points)"], r["t high (points)"], signed=True),
             f"±{_fmt(r['t half-width (points)'])}", f"±{_fmt(r['image half-width (points)'])}",
             r["verdict (a > b)"]] for _, r in t.iterrows()]
    return _table(["difference (points)", "seeds", "mean [95 % t CI over seeds]", "half-width over seeds",
                   "half-width over test images (one seed)", "verdict on A > B"], rows)


def seed_studies_block(figures: Path, data: Path) -> str:
    """Table 3, Figure 2 and the ablations over seeds (notebook 10, ``claims.study_differences``)."""
    t = pd.read_csv(figures / "seeds_studies.csv")
    rows = [[re.sub(r" \(points\)$", "", r["claim"]), int(r["seeds"]),
             _ci(r["mean difference (points)"], r["t low (points)"], r["t high (points)"], signed=True),
             f"±{_fmt(r['image half-width (points)'])}", r["verdict"]] for _, r in t.iterrows()]
    return _table(["claim (points)", "seeds", "mean [95 % t CI over seeds]",
                   "half-width over test images (one seed)", "verdict over seeds"], rows)


def claims_block(figures: Path, data: Path) -> str:
    return (figures / "claims.md").read_text().strip()


def verdicts_block(figures: Path, data: Path) -> str:
    """One line per verdict of the claims table, naming its claims: the README's summary, never typed in."""
    t = pd.read_csv(figures / "claims.csv")
    lines = []
    order = [*VERDICTS, NO_VERDICT]
    for verdict in order + sorted(set(t["verdict"]) - set(order)):
        rows = t[t["verdict"] == verdict]
        if len(rows):
            # the claims without their trailing unit, "(points)" or "(ratio; ...)"
            claims = "; ".join(re.sub(r" \((points|ratio)[^()]*\)$", "", c) for c in rows["claim"])
            lines.append(f"- **{verdict}** ({len(rows)} of {len(t)}): {claims}.")
    return "\n".join(lines)


def plan_check_block(figures: Path, data: Path) -> str:
    """The memory planner's prediction beside the measured peak, per method and K (benchmarks/plan_check.py): the
    median of the repeated measurements and their range (a file of single measurements: the one measurement)."""
    from soupkit.methods.registry import METHODS  # noqa: PLC0415

    t = pd.read_csv(data / "results" / "plan_check_cpu.csv")
    repeated = "measured_min_mb" in t.columns
    ks = sorted(t["K"].unique())

    def cell(r: pd.Series) -> str:
        spread = f" [{r['measured_min_mb']:.1f}-{r['measured_max_mb']:.1f}]" if repeated else ""
        return f"{r['predicted_mb']:.1f} / {r['measured_mb']:.1f}{spread} ({r['ratio']:.2f})"

    rows = []
    for method, g in t.groupby("method", sort=False):
        by_k = {int(r["K"]): cell(r) for _, r in g.iterrows()}
        rows.append([f"`{method}`", f"`{g['formula'].iloc[0]}`", *[by_k.get(int(k), "-") for k in ks]])
    within = int(t["within"].sum())
    measured = "predicted / median [range] MB (ratio)" if repeated else "predicted / measured MB (ratio)"
    blockwise = t[t["method"].map(lambda m: m in METHODS and METHODS[m].family == "mehl")]
    each = (f"{int(t['repeats'].min())} fresh processes each, the ratio to their median" if repeated
            else "each in a fresh process, one measurement each")
    return (_table(["method", "CPU formula", *[f"K = {k}: {measured}" for k in ks]], rows)
            + f"\n\n{within} of {len(t)} (method, K) within 15 % ("
              + (f"MEHL b = {int(blockwise['b'].max())}, " if len(blockwise) else "")
              + f"data batch {int(t['batch'].iloc[0])}; {each}).")


def numerics_block(figures: Path, data: Path) -> str:
    t = pd.read_csv(data / "results" / "numerics_cpu.csv")
    rows = [[r["numerics"], r["setting"], r["cpu_capability"], f"`{r['sha256']}`"] for _, r in t.iterrows()]
    ratio = t["timing_ratio_pinned_over_native"].iloc[0]
    return (_table(["numerics", "setting", "ATen kernels", "sha256 of the weights (first 16)"], rows)
            + f"\n\nTraining time pinned / native, measured side by side (median of alternated runs): {ratio:.2f}.")


def tolerances_block(figures: Path, data: Path) -> str:
    t = pd.read_csv(TOLERANCE_FILE)
    rows = [[r["kind"], _fmt(r["tolerance"]), _fmt(r["seed_sd_points"], 3), _fmt(r["float_path_max_points"], 3)]
            for _, r in t.iterrows()]
    return (_table(["kind of number", "tolerance (points)", "pooled sd over seeds (points)",
                    "largest float-path difference measured (points)"], rows)
            + f"\n\nRule: {t['rule'].iloc[0]}.")


def power_block(figures: Path, data: Path) -> str:
    from soupkit.experiments.claims import power_line  # noqa: PLC0415

    return power_line(pd.read_csv(figures / "seeds_comparisons.csv")) + "."


BLOCKS: dict[str, Callable[[Path, Path], str]] = {
    "main_table": main_table_block, "shifts": shifts_block, "seeds": seeds_block, "seed_comparisons": seed_comparisons_block,
    "power": power_block, "seed_studies": seed_studies_block,
    "claims": claims_block, "verdicts": verdicts_block, "plan_check": plan_check_block, "numerics": numerics_block, "tolerances": tolerances_block,
}
_BLOCK = re.compile(r"<!-- generated: (?P<name>[a-z_]+) -->\n(?P<body>.*?)\n?<!-- end: (?P=name) -->", re.S)


def render(name: str, figures: Path | None = None, data: Path | None = None, root: Root = ".") -> str:
    """The markdown of block ``name`` from the result files (a line saying which file is missing, if one is);
    ``figures`` and ``data`` default to ``root``'s ``figures/`` and ``data/``."""
    figures = figures if figures is not None else Path(root) / "figures"
    data = data if data is not None else Path(root) / "data"
    try:
        return BLOCKS[name](figures, data)
    except FileNotFoundError as err:
        return f"(not generated: {Path(err.filename).name} is missing; run the notebook that writes it)"


def update_readme(path: Path | None = None, write: bool = True, root: Root = ".") -> list[str]:
    """Re-render every generated block of ``path`` (default: ``root``'s README.md) from ``root``'s files;
    returns the names of blocks that changed (written if ``write``)."""
    path = path if path is not None else Path(root) / "README.md"
    text = path.read_text()
    changed = []

    def fill(m: re.Match) -> str:
        body = render(m["name"], root=root)
        if body != m["body"]:
            changed.append(m["name"])
        return f"<!-- generated: {m['name']} -->\n{body}\n<!-- end: {m['name']} -->"

    new = _BLOCK.sub(fill, text)
    if write and changed:
        path.write_text(new)
    return changed


def _documents(root: Root = ".") -> list[Path]:
    root = Path(root)
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


DOCUMENTS: Callable[..., list[Path]] = _documents  # DOCUMENTS(root): the documents with generated blocks


def update_documents(paths: Sequence[Path] | None = None, write: bool = True, root: Root = ".") -> dict[str, list[str]]:
    """:func:`update_readme` on ``root``'s README.md and every docs/*.md; returns ``{file name: changed blocks}``
    (those with a change only)."""
    out = {}
    root = Path(root).resolve()
    for path in paths if paths is not None else DOCUMENTS(root):
        changed = update_readme(path, write=write, root=root)
        if changed:
            out[str(path.relative_to(root)) if path.is_relative_to(root) else str(path)] = changed
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soupkit.experiments.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the generated blocks of README.md and docs/")
    parser.add_argument("--check", action="store_true", help="exit 1 when a block differs")
    parser.add_argument("--root", default=".", help="the repository (README.md, docs/, figures/, data/); "
                        "default: the current folder")
    args = parser.parse_args(argv)
    changed = update_documents(write=args.write, root=args.root)
    listing = "; ".join(f"{f}: {', '.join(names)}" for f, names in changed.items())
    print(("rewrote: " if args.write else "differ: ") + (listing or "none"))
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
