"""The paper's claims, each with our measured effect, its 95 % interval and a verdict decided by the interval.

Everything is read from the result files the notebooks wrote (records, per-image predictions, tables); nothing
is typed in. Two intervals per comparison where both exist:

* **images**: paired bootstrap over the test images of one run (``stats.paired_difference``): how sure we are
  about *this* zoo;
* **seeds**: Student's t over S seeds of the whole pipeline (``stats.seed_interval``, notebook 10): how sure
  we are about the *recipe*. It decides the verdict where it exists; otherwise the image interval does.

Verdicts (``stats.verdict``): *reproduces* when the interval excludes 0 on the paper's side, *contradicted*
when it excludes 0 on the other side, *cannot tell at this scale* when it contains 0. A claim that two
settings do not differ ("equal") reproduces when the interval lies within ±``EQUIVALENCE_MARGIN`` points,
is contradicted when it lies outside, and cannot tell otherwise. A memory or time ratio measured once (one run,
the benchmark) has no interval and gets ``stats.NO_VERDICT``, *no verdict (one measurement)*.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd

from soupkit.experiments.results import paper_table
from soupkit.experiments.run import read_correct
from soupkit.experiments.stats import (NO_VERDICT, VERDICTS, Interval, format_interval, mean_over_sets,
                                       paired_difference, seed_interval, seeds_needed, verdict)
from soupkit.methods.registry import DISPLAY

__all__ = ["EQUIVALENCE_MARGIN", "POWER_TARGET", "BEYOND_PAIRS", "SHIFT_PAIRS", "claims_table", "comparison_verdict", "claims_markdown", "equivalence_verdict",
           "power_line", "study_differences", "TABLE1_PAIRS"]

POWER_TARGET = 0.75  # points: the half-width the MEHL-Soup+ - greedy interval over seeds should reach
EQUIVALENCE_MARGIN = 0.5  # points: "does not vary much" (the paper's Fig. 2(a): < 0.1 % at ImageNet scale)
# Table 1's orderings the paper states (A better than B)
TABLE1_PAIRS: tuple[tuple[str, str], ...] = (
    ("mehl+", "learned+"), ("mehl+", "greedy"), ("mehl+", "ensemble"), ("mehl+", "best"), ("hl", "learned"),
    ("mehl", "learned"),
)
# the released code's variant should implement the paper's algorithm: judged as equivalence
RELEASED_PAIR = ("mehl+released", "mehl+")


# beyond the paper: MEHL-Soup+ against the soups users would pick instead (no expected side: the verdict names
# the better one when the interval excludes 0)
BEYOND_PAIRS: tuple[tuple[str, str], ...] = (("mehl+", "model_stock"), ("mehl+", "task_arithmetic"))
# under distribution shift (the shift average): model-soups' two orderings (its Table with the five ImageNet
# shifts: greedy above the best model, uniform above greedy), then MEHL-Soup+ against greedy (not in either paper)
SHIFT_PAIRS: tuple[tuple[str, str, int | str], ...] = (("greedy", "best", +1), ("uniform", "greedy", +1),
                                                        ("mehl+", "greedy", "compare"))


def comparison_verdict(interval: Interval, a: str, b: str) -> str:
    """Verdict on a comparison no paper makes: which of A and B is better, when the interval of A - B excludes 0."""
    if interval.low > 0:
        return f"{DISPLAY.get(a, a)} better"
    if interval.high < 0:
        return f"{DISPLAY.get(b, b)} better"
    return VERDICTS[2]


def equivalence_verdict(interval: Interval, margin: float = EQUIVALENCE_MARGIN) -> str:
    """Verdict on a claim of *no* difference: the interval (points) within ±margin, outside, or neither."""
    if -margin < interval.low and interval.high < margin:
        return VERDICTS[0]
    if interval.low > margin or interval.high < -margin:
        return VERDICTS[1]
    return VERDICTS[2]


def _correct(path: Path) -> np.ndarray | None:
    try:
        return read_correct(path).astype(float)
    except FileNotFoundError:
        return None


def _row(claim: str, paper: str, images: Interval | None, seeds: Interval | None, expected: int | str,
         basis: str, note: str = "", pair: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    decide = seeds if seeds is not None else images
    if decide is None:
        outcome = "not run"
    elif expected == "compare":
        outcome = comparison_verdict(decide, *pair)
    elif expected == "equal":
        outcome = equivalence_verdict(decide)
    else:
        outcome = verdict(decide, int(expected))
    return {"claim": claim, "paper": paper,
            "ours, one run (95 % CI over test images)": format_interval(images, signed=True) if images else "-",
            "ours, over seeds (95 % CI)": format_interval(seeds, signed=True) if seeds else "-",
            "verdict": outcome, "decided by": ("seeds" if seeds is not None else "test images") if decide else "-",
            "basis": basis + (f"; {note}" if note else "")}


def _paper_acc(table: pd.DataFrame, method: str) -> float:
    return float(table.set_index("method").loc[method, "test_accuracy"])


def _pair_intervals(out: Path, seeds: pd.DataFrame | None, a: str, b: str
                    ) -> tuple[Interval | None, Interval | None, int]:
    """A minus B (points) in the main table (paired over test images) and over seeds; and the seed count."""
    ca, cb = _correct(out / "main_table" / f"{a}.json"), _correct(out / "main_table" / f"{b}.json")
    images = paired_difference(ca, cb).scaled(100) if ca is not None and cb is not None else None
    across, n_seeds = None, 0
    if seeds is not None and {a, b} <= set(seeds["method"]):
        wide = seeds.pivot_table(index="seed", columns="method", values="test_accuracy")
        diff = (wide[a] - wide[b]).dropna() * 100
        n_seeds = len(diff)
        across = seed_interval(diff.to_numpy()) if n_seeds >= 2 else None
    return images, across, n_seeds


def _basis(across: Interval | None, n_seeds: int) -> str:
    return "main table (02)" + (f" and {n_seeds} seeds (10)" if across is not None else "")


def _table1(out: Path, seeds: pd.DataFrame | None, pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    paper = paper_table("table1_vitb32_imagenet")
    rows = []
    for a, b in pairs:
        images, across, n_seeds = _pair_intervals(out, seeds, a, b)
        paper_text = f"{_paper_acc(paper, a) - _paper_acc(paper, b):+.2f}"
        rows.append(_row(f"Table 1: {DISPLAY.get(a, a)} more accurate than {DISPLAY.get(b, b)} (points)",
                         paper_text, images, across, +1, _basis(across, n_seeds)))
    return rows


def _released(out: Path, seeds: pd.DataFrame | None) -> list[dict[str, Any]]:
    """The released code's MEHL-Soup+ against the paper's algorithm (not a claim of the paper: a check that
    the code and the text describe one method)."""
    a, b = RELEASED_PAIR
    images, across, n_seeds = _pair_intervals(out, seeds, a, b)
    return [_row(f"Released code: {DISPLAY[a]} as accurate as {DISPLAY[b]} (points)",
                 "- (the paper reports its algorithm only)", images, across, "equal",
                 _basis(across, n_seeds) + f"; 'equal' = within ±{EQUIVALENCE_MARGIN} points")]


def _ratio_rows(out: Path, seeds_dir: Path | None, benchmark: Path | None) -> list[dict[str, Any]]:
    """Learned-Soup+ / MEHL-Soup+ peak memory and construction time (paper: 253/19 GB, 7701/808 s)."""
    rows = []
    per_seed: dict[str, list[float]] = {"peak_memory_bytes": [], "seconds_total": []}
    if seeds_dir is not None:
        for folder in sorted(seeds_dir.glob("seed_*")):
            recs = {}
            for m in ("learned+", "mehl+"):
                path = folder / f"{m}.json"  # the seed's own run, not one of its side studies (seed_studies)
                if path.is_file():
                    recs[m] = pd.read_json(path, typ="series")
            if len(recs) == 2:
                for col in per_seed:
                    per_seed[col].append(float(recs["learned+"][col]) / float(recs["mehl+"][col]))
    main = {}
    for m in ("learned+", "mehl+"):
        path = out / "main_table" / f"{m}.json"
        if path.is_file():
            main[m] = pd.read_json(path, typ="series")
    for col, what, paper_text, expected in (("peak_memory_bytes", "peak memory", "253 / 19 GB = 13.3x", +1),
                                            ("seconds_total", "construction time", "7701 / 808 s = 9.5x", +1)):
        one = (float(main["learned+"][col]) / float(main["mehl+"][col])) if len(main) == 2 else None
        values = per_seed[col]
        across = seed_interval(np.log(values)) if len(values) >= 2 else None
        # ratios: the interval of the log ratio, reported as a ratio; the verdict is on log ratio > 0 (ratio > 1)
        shown = Interval(float(np.exp(across.estimate)), float(np.exp(across.low)), float(np.exp(across.high))) if across else None
        outcome = verdict(across, expected) if across else NO_VERDICT
        basis = f"embedded zoo, one run: {one:.2f}x" if one else "embedded zoo: not run"
        rows.append({"claim": f"Learned-Soup+ / MEHL-Soup+ {what} (ratio; > 1: MEHL-Soup+ cheaper)",
                     "paper": paper_text, "ours, one run (95 % CI over test images)": f"{one:.2f}x" if one else "-",
                     "ours, over seeds (95 % CI)": (f"{shown.estimate:.2f}x [{shown.low:.2f}, {shown.high:.2f}]"
                                                   if shown else "-"),
                     "verdict": outcome, "decided by": "seeds" if across else "-",
                     "basis": basis + (f"; {len(values)} seeds, t interval of the log ratio" if across else
                                       "; no repeated measurement, so no verdict")})
    if benchmark is not None and benchmark.is_file():
        bench = pd.read_csv(benchmark)
        ok = bench[bench.get("status", "ok") == "ok"]
        k = int(ok["K"].max())
        at = ok[ok["K"] == k].set_index("method")["peak_memory_bytes"]
        if {"learned+", "mehl+"} <= set(at.index):
            rows.append({"claim": f"Learned-Soup+ / MEHL-Soup+ peak memory at ViT-B/32 size, K = {k} (ratio)",
                         "paper": "13.3x at K = 72", "ours, one run (95 % CI over test images)":
                             f"{at['learned+'] / at['mehl+']:.2f}x", "ours, over seeds (95 % CI)": "-",
                         "verdict": NO_VERDICT, "decided by": "-",
                         "basis": f"{benchmark.name}: one measurement per K (CPU), no interval, so no verdict"})
    return rows


class _Study(NamedTuple):
    """One claim measured in a study folder: its text, the paper's number, the expected sign (or "equal"),
    where it comes from, and the difference over that folder's test images (points)."""

    claim: str
    paper: str
    expected: int | str
    basis: str
    images: Interval | None  # None: a run or its predictions are missing ("not run")
    note: str = ""


def _record(path: str, study_dir: Path) -> Path:
    """A ``record_path`` of a records file: the same file under ``study_dir`` (``<setting>/<method>.json`` or
    ``<name>.json``) when it is there, so a study reads the same from any folder; else the path as written."""
    p = Path(path)
    for candidate in (study_dir / p.parent.name / p.name, study_dir / p.name):
        if candidate.is_file():
            return candidate
    return p


def _top_models(root: Path) -> list[_Study]:
    """Table 3: greedy's drop after removing the top n minus MEHL-Soup+'s drop (> 0: MEHL+ less sensitive)."""
    study = root / "top_models"
    if not (study / "records.csv").is_file():
        return []
    recs = pd.read_csv(study / "records.csv")
    paper = paper_table("table3_top_models")
    rows = []
    counts = sorted(recs["eliminated"].unique())
    for n in counts[1:]:
        c = {}
        for m in ("greedy", "mehl+"):
            for e in (0, n):
                hit = recs[(recs["method"] == m) & (recs["eliminated"] == e)]
                c[m, e] = _correct(_record(hit["record_path"].iloc[0], study)) if len(hit) else None
        if any(v is None for v in c.values()):
            continue
        images = paired_difference(c["greedy", 0] - c["greedy", n], c["mehl+", 0] - c["mehl+", n]).scaled(100)
        paper_text = "-"
        pe = recs.loc[recs["eliminated"] == n, "paper_eliminated"].iloc[0] if "paper_eliminated" in recs else None
        if paper is not None and pe is not None and not pd.isna(pe):
            p = paper.pivot_table(index="eliminated", columns="method", values="test_accuracy")
            if int(pe) in p.index:
                paper_text = (f"{(p.loc[0, 'greedy'] - p.loc[int(pe), 'greedy']) - (p.loc[0, 'mehl+'] - p.loc[int(pe), 'mehl+']):+.2f}"
                              f" (top {int(pe)} of 72)")
        rows.append(_Study(f"Table 3: greedy loses more than MEHL-Soup+ when the top {n} models are removed (points)",
                           paper_text, +1, "top models (04)", images))
    return rows


def _pair_in(study: Path, select_a: Callable[[pd.DataFrame], pd.Series],
             select_b: Callable[[pd.DataFrame], pd.Series]) -> Interval | None:
    if not (study / "records.csv").is_file():
        return None
    recs = pd.read_csv(study / "records.csv")
    a, b = recs[select_a(recs)], recs[select_b(recs)]
    if not len(a) or not len(b):
        return None
    ca = _correct(_record(a["record_path"].iloc[0], study))
    cb = _correct(_record(b["record_path"].iloc[0], study))
    return paired_difference(ca, cb).scaled(100) if ca is not None and cb is not None else None


def _finetuning_cost(root: Path) -> list[_Study]:
    """Figure 2: MEHL-Soup+ on the first half of the models against greedy on all of them."""
    study = root / "finetuning_cost"
    if not (study / "records.csv").is_file():
        return []
    sizes = sorted(pd.read_csv(study / "records.csv")["num_finetuned"].unique())
    k, half = sizes[-1], [s for s in sizes if s <= sizes[-1] // 2]
    if not half:
        return []
    h = half[-1]
    images = _pair_in(study, lambda r: (r.method == "mehl+") & (r.num_finetuned == h),
                      lambda r: (r.method == "greedy") & (r.num_finetuned == k))
    return [_Study(f"Figure 2: MEHL-Soup+ with the first {h} fine-tunes at least as accurate as greedy with all {k} "
                   "(points)", "~0 (81 % with < 27 models vs > 54 for greedy, of 72)", +1, "fine-tuning cost (06)",
                   images)]


def _ablations(root: Path, figures: Path | None = None) -> list[_Study]:
    """Fig. 2(a-c): b, outer passes and inner epochs change little; Appendix D: decentralising helps. The
    table is ``<root>/ablations/ablations.csv`` (``run_ablations``), else ``<figures>/ablations.csv``."""
    study = root / "ablations"
    table_path = study / "ablations.csv"
    if not table_path.is_file() and figures is not None:
        table_path = figures / "ablations.csv"
    if not table_path.is_file():
        return []
    table = pd.read_csv(table_path)

    def difference(setting_a: str, setting_b: str) -> Interval | None:
        ca, cb = _correct(study / f"{setting_a}.json"), _correct(study / f"{setting_b}.json")
        return paired_difference(ca, cb).scaled(100) if ca is not None and cb is not None else None

    rows = []
    labels = {"model_batch_size": ("b", "Fig. 2(a): model mini-batch size b does not change accuracy",
                                   "< 0.1 % across b"),
              "outer_passes": ("passes", "Fig. 2(b): more outer passes bring little", "minor gain"),
              "epochs": ("epochs", "Fig. 2(c): more inner iterations bring no significant gain", "no significant gain")}
    margin = f"'equal' = within ±{EQUIVALENCE_MARGIN} points"
    for name, (short, claim, paper_text) in labels.items():
        sub = table[table["study"] == name]
        if len(sub) < 2:
            continue
        lo, hi = sub.iloc[0], sub.iloc[-1]
        rows.append(_Study(f"{claim}: {short} = {hi['value']} minus {short} = {lo['value']} (points)",
                           paper_text, "equal", "ablations (07)", difference(hi["setting"], lo["setting"]), margin))
    sub = table[table["study"] == "decentralize"]
    if len(sub) >= 2:
        on = sub[sub["value"].astype(str) == "True"].iloc[0]
        off = sub[sub["value"].astype(str) == "False"].iloc[0]
        rows.append(_Study("Appendix D: directions θ_i − θ̄ more accurate than θ_i (points)",
                           "+0.60 (81.62 vs 81.02)", +1, "ablations (07)", difference(on["setting"], off["setting"])))
    return rows


def _resnet(root: Path) -> list[_Study]:
    """Appendix C: MEHL-Soup+ against greedy and Learned-Soup+ on the ResNet zoo (``<root>/resnet``)."""
    study = root / "resnet"
    paper = paper_table("appendixC_resnet101_cifar100")
    rows = []
    for a, b in (("mehl+", "greedy"), ("mehl+", "learned+")):
        ca, cb = _correct(study / f"{a}.json"), _correct(study / f"{b}.json")
        if ca is None or cb is None:
            continue
        rows.append(_Study(f"Appendix C (ResNet, BatchNorm): {DISPLAY[a]} more accurate than {DISPLAY[b]} (points)",
                           f"{_paper_acc(paper, a) - _paper_acc(paper, b):+.2f}", +1, "ResNet zoo (09)",
                           paired_difference(ca, cb).scaled(100)))
    return rows


def _side_studies(root: Path, figures: Path | None = None) -> list[_Study]:
    """Every claim of Table 3, Figure 2, the ablations and Appendix C measured in the study folders under
    ``root``."""
    return _top_models(root) + _finetuning_cost(root) + _ablations(root, figures) + _resnet(root)


def _seed_folders(seeds_dir: Path | None) -> list[tuple[int, Path]]:
    if seeds_dir is None or not seeds_dir.is_dir():
        return []
    found = [(int(p.name.split("_", 1)[1]), p) for p in seeds_dir.glob("seed_*")
             if p.is_dir() and p.name.split("_", 1)[1].isdigit()]
    return sorted(found)


def study_differences(seeds_dir: str | os.PathLike, level: float = 0.95) -> pd.DataFrame:
    """Each claim of Table 3, Figure 2, the ablations and Appendix C over the seeds whose folder under
    ``seeds_dir`` holds its study (``soupkit.experiments.seed_studies``): the per-seed differences (points, as
    the claims table measures them in the main run), their mean with Student's t interval, and the mean per-seed
    half-width of the paired bootstrap over test images.

    Returns:
        one row per claim, in the claims table's order: ``claim``, ``expected`` (+1 or "equal"), ``seeds``,
        ``mean difference (points)``, ``t low (points)`` / ``t high (points)`` / ``t half-width (points)``
        (NaN with fewer than 2 seeds), ``image half-width (points)``, ``verdict`` (of the t interval, as the
        claims table decides it), then ``seed <s> (points)`` per seed.
    """
    per_seed = {seed: {c.claim: c for c in _side_studies(folder) if c.images is not None}
                for seed, folder in _seed_folders(Path(seeds_dir))}
    claims = list(dict.fromkeys(name for found in per_seed.values() for name in found))
    rows: list[dict[str, Any]] = []
    for name in claims:
        seen = {s: found[name] for s, found in per_seed.items() if name in found}
        values = np.array([c.images.estimate for c in seen.values()])
        interval = seed_interval(values, level) if len(values) >= 2 else None
        expected = next(iter(seen.values())).expected
        outcome = (equivalence_verdict(interval) if expected == "equal" else verdict(interval, int(expected))) \
            if interval else VERDICTS[2]
        row = {"claim": name, "expected": expected, "seeds": len(values),
               "mean difference (points)": float(values.mean()),
               "t low (points)": interval.low if interval else np.nan,
               "t high (points)": interval.high if interval else np.nan,
               "t half-width (points)": interval.half_width if interval else np.nan,
               "image half-width (points)": float(np.mean([c.images.half_width for c in seen.values()])),
               "verdict": outcome}
        row.update({f"seed {s} (points)": c.images.estimate for s, c in seen.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _study_rows(out: Path, figures: Path, seeds_dir: Path | None) -> list[dict[str, Any]]:
    """The claims of Table 3, Figure 2, the ablations and Appendix C: the main run's interval over test images
    and, where the multi-seed study ran the same study on 2 or more seeds, the t interval over them."""
    across = study_differences(seeds_dir) if seeds_dir is not None else pd.DataFrame()
    across = across.set_index("claim") if len(across) else pd.DataFrame(columns=["seeds"])
    rows = []
    for c in _side_studies(out, figures):
        seeds = None
        if c.claim in across.index and across.loc[c.claim, "seeds"] >= 2:
            hit = across.loc[c.claim]
            seeds = Interval(float(hit["mean difference (points)"]), float(hit["t low (points)"]),
                             float(hit["t high (points)"]))
        basis = f"{c.basis}, one zoo" if seeds is None else \
            f"{c.basis} and {int(across.loc[c.claim, 'seeds'])} seeds (10)"
        rows.append(_row(c.claim, c.paper, c.images, seeds, c.expected, basis, c.note))
    return rows




def _larger_model(out: Path) -> list[dict[str, Any]]:
    """Table 2: Learned-Soup(+) does not fit where MEHL-Soup(+) runs (a count, no interval)."""
    base = out / "larger_model"
    if not base.is_dir():
        return []
    fits = {}
    for task in sorted(p.name for p in base.iterdir() if p.is_dir()):
        for m in ("learned", "learned+", "hl", "hl+", "mehl", "mehl+"):
            path = base / task / f"{m}.json"
            if path.is_file():
                fits[task, m] = pd.read_json(path, typ="series").get("status", "ok") == "ok"
    if not fits:
        return []
    tasks = sorted({t for t, _ in fits})
    mehl_ok = all(fits.get((t, m), False) for t in tasks for m in ("mehl", "mehl+"))
    learned_out = [f"{m} on {t}" for t in tasks for m in ("learned", "learned+") if not fits.get((t, m), True)]
    outcome = VERDICTS[0] if mehl_ok and learned_out else VERDICTS[2] if mehl_ok else VERDICTS[1]
    return [{"claim": "Table 2: under a memory limit MEHL-Soup(+) runs where Learned-Soup(+) does not fit",
             "paper": "Learned-Soup(+) > 256 GB; MEHL 23 GB", "ours, one run (95 % CI over test images)":
                 f"MEHL fit on {len(tasks)}/{len(tasks)} tasks; did not fit: {', '.join(learned_out) or 'none'}",
             "ours, over seeds (95 % CI)": "-", "verdict": outcome, "decided by": "counts",
             "basis": "larger model (03) under its memory cap; which capped runs fit varies from run to run"}]


def _coefficients(figures: Path) -> list[dict[str, Any]]:
    path = figures / "coefficients.csv"
    if not path.is_file():
        return []
    t = pd.read_csv(path).set_index("method")
    col = "% outside [0, 1]"
    if not {"mehl+", "learned+"} <= set(t.index) or col not in t.columns:
        return []
    mehl, learned = float(t.loc["mehl+", col]), float(t.loc["learned+", col])
    outcome = VERDICTS[0] if mehl > 0 and learned == 0 else VERDICTS[1]
    return [{"claim": "Figure 1: MEHL-Soup+ extrapolates (coefficients outside [0, 1]); Learned-Soup+ cannot",
             "paper": "MEHL-Soup+ has coefficients outside [0, 1]; Learned-Soup+ none",
             "ours, one run (95 % CI over test images)": f"{mehl:.1f} % vs {learned:.1f} % of coefficients",
             "ours, over seeds (95 % CI)": "-", "verdict": outcome, "decided by": "counts",
             "basis": f"coefficients (05): {int(t.loc['mehl+', 'coefficients'])} per method, counted exactly"}]


def _beyond(out: Path, seeds: pd.DataFrame | None) -> list[dict[str, Any]]:
    """MEHL-Soup+ against Model Stock and task arithmetic (test accuracy), where the main table ran them."""
    rows = []
    for a, b in BEYOND_PAIRS:
        images, across, n_seeds = _pair_intervals(out, seeds, a, b)
        if images is None and across is None:
            continue
        rows.append(_row(f"Beyond the paper: {DISPLAY.get(a, a)} vs {DISPLAY.get(b, b)} (points, A − B)",
                         "- (not in the paper)", images, across, "compare", _basis(across, n_seeds), pair=(a, b)))
    return rows


def _shift_correct(record: Path) -> dict[str, np.ndarray]:
    """``{shift: correct [N_s]}`` of one main-table record (its ``shift_<name>_accuracy`` fields)."""
    if not record.is_file():
        return {}
    fields = pd.read_json(record, typ="series").index
    names = [f[len("shift_"):-len("_accuracy")] for f in fields if f.startswith("shift_") and f.endswith("_accuracy")]
    try:
        return {n: read_correct(record, f"shift-{n}").astype(float) for n in names}
    except FileNotFoundError:
        return {}


def _shifts(out: Path) -> list[dict[str, Any]]:
    """Orderings under distribution shift: A − B of the average accuracy over the zoo's shifts, the per-image
    differences of each shift resampled on their own (``stats.mean_over_sets``). One run: no seeds."""
    paper = paper_table("model_soups_shifts_vitb32_imagenet").set_index("method")
    rows = []
    for a, b, expected in SHIFT_PAIRS:
        ca, cb = (_shift_correct(out / "main_table" / f"{m}.json") for m in (a, b))
        names = [n for n in ca if n in cb and ca[n].shape == cb[n].shape]
        if not names:
            continue
        images = mean_over_sets([ca[n] - cb[n] for n in names]).scaled(100)
        who = "model-soups" if expected != "compare" else "Beyond the paper"
        paper_text = (f"{paper.loc[a, 'shift_average'] - paper.loc[b, 'shift_average']:+.2f} (ImageNet shifts)"
                      if a in paper.index and b in paper.index else "- (not in the paper)")
        rows.append(_row(f"{who}: {DISPLAY.get(a, a)} more robust than {DISPLAY.get(b, b)} (shift average, points)"
                         if expected != "compare" else
                         f"{who}: {DISPLAY.get(a, a)} vs {DISPLAY.get(b, b)} under shift (shift average, points, A − B)",
                         paper_text, images, None, expected,
                         f"main table (02), {len(names)} shifts ({', '.join(names)})", pair=(a, b)))
    return rows


def claims_table(out_dir: str | os.PathLike, figures_dir: str | os.PathLike,
                 seeds_dir: str | os.PathLike | None = None, benchmark_csv: str | os.PathLike | None = None,
                 pairs: Sequence[tuple[str, str]] = TABLE1_PAIRS) -> pd.DataFrame:
    """One row per claim of the paper, from the result files under ``out_dir`` (records with per-image
    predictions), ``figures_dir`` (tables), ``seeds_dir`` (the multi-seed study's ``records.csv``, optional)
    and ``benchmark_csv`` (the ViT-B/32 memory benchmark, e.g. the repository's
    ``data/results/benchmark_cpu.csv``; None or "": no benchmark row). Claims whose inputs are missing are left
    out. Differences are in accuracy points, A minus B."""
    out, figures = Path(out_dir), Path(figures_dir)
    seeds = None
    seeds_path = Path(seeds_dir) if seeds_dir else None
    if seeds_path is not None and (seeds_path / "records.csv").is_file():
        seeds = pd.read_csv(seeds_path / "records.csv")
    rows = _table1(out, seeds, pairs) + _released(out, seeds)
    # memory and time over seeds only from a study whose methods ran in fresh processes (honest peaks)
    isolated = seeds is not None and _isolated(seeds_path)
    rows += _ratio_rows(out, seeds_path if isolated else None, Path(benchmark_csv) if benchmark_csv else None)
    study = _study_rows(out, figures, seeds_path)
    # the claims table's order: Table 2, Table 3, Figure 1, Figure 2, the ablations, Appendix C
    top = [r for r in study if r["claim"].startswith("Table 3")]
    rows += _larger_model(out) + top + _coefficients(figures) + [r for r in study if r not in top]
    rows += _shifts(out) + _beyond(out, seeds)
    return pd.DataFrame(rows)


def _isolated(seeds_dir: Path) -> bool:
    """Whether every learned+/mehl+ record of the multi-seed study ran in its own process (``isolated``)."""
    records = [p for m in ("learned+", "mehl+") for p in seeds_dir.glob(f"seed_*/{m}.json")]
    return bool(records) and all(pd.read_json(p, typ="series").get("isolated", False) is True for p in records)


def claims_markdown(table: pd.DataFrame) -> str:
    """The claims table as a GitHub markdown table (the README's copy is this text)."""
    cols = ["claim", "paper", "ours, one run (95 % CI over test images)", "ours, over seeds (95 % CI)", "verdict"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(str(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def power_line(comparisons: pd.DataFrame, a: str = "mehl+", b: str = "greedy", target: float = POWER_TARGET,
               level: float = 0.95) -> str:
    """Whether the multi-seed study can decide A vs B: its t half-width against ``target`` (points), and the
    seeds that the measured per-seed spread would need (``comparisons``: ``seeds.seed_comparisons`` output)."""
    hit = comparisons[(comparisons["a"] == a) & (comparisons["b"] == b)]
    if not len(hit):
        return f"no multi-seed comparison of {a} and {b}: power not assessed"
    row = hit.iloc[0]
    per_seed = row[[c for c in comparisons.columns if c.startswith("seed ") and c.endswith("(points)")]].dropna()
    sd = float(np.std(per_seed.to_numpy(dtype=float), ddof=1))
    need = seeds_needed(sd, target, level)
    half = float(row["t half-width (points)"])
    return (f"{DISPLAY.get(a, a)} − {DISPLAY.get(b, b)} over {int(row['seeds'])} seeds: "
            f"{row['mean difference (points)']:+.2f} points, {level:.0%} t interval ±{half:.2f} "
            f"({'within' if half <= target else 'wider than'} the ±{target} target); per-seed sd {sd:.2f} points, "
            f"so ±{target} needs {need if need else 'more than 1000'} seeds at this spread "
            f"(a test-image interval within one seed: ±{row['image half-width (points)']:.2f})")
