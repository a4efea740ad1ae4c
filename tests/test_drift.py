"""The drift check: equal structure, accuracies within tolerance, and it fails on a perturbed record."""
import shutil
from pathlib import Path

import pandas as pd
import pytest

from soupkit.experiments.drift import column_kind, compare_dirs, compare_tables, derive_tolerances, main

TOL = {"accuracy": 1.0, "difference": 2.0}


def _table() -> pd.DataFrame:
    return pd.DataFrame({"method": ["greedy", "mehl+"], "test acc (%)": [85.35, 86.10],
                         "construction (s)": [13.2, 19.9], "#epoch": [63, 20], "paper acc (%)": [81.03, 81.62]})


def test_kinds() -> None:
    t = _table()
    assert [column_kind(c, t[c]) for c in t.columns] == ["exact", "accuracy", "cost", "exact", "exact"]
    assert column_kind("test_accuracy", pd.Series([0.85])) == "accuracy"
    assert column_kind("test change (points)", pd.Series([0.1])) == "difference"
    assert column_kind("models left", pd.Series([32, 22])) == "exact"


def test_within_tolerance_and_costs_ignored() -> None:
    rerun = _table()
    rerun.loc[0, "test acc (%)"] += 0.99
    rerun.loc[1, "construction (s)"] = 500.0
    drifts, skipped = compare_tables(_table(), rerun, TOL, "t.csv")
    assert drifts == []
    assert skipped == ["construction (s) (cost)"]


def test_past_tolerance_is_named() -> None:
    rerun = _table()
    rerun.loc[1, "test acc (%)"] += 1.01
    drifts, _ = compare_tables(_table(), rerun, TOL, "t.csv")
    assert len(drifts) == 1
    assert "mehl+" in str(drifts[0]) and "test acc (%)" in str(drifts[0]) and "tolerance 1" in str(drifts[0])


def test_structure_must_be_equal() -> None:
    rerun = _table()
    rerun.loc[0, "method"] = "best"
    rerun.loc[1, "#epoch"] = 21
    rerun.loc[1, "paper acc (%)"] = 81.6
    drifts, _ = compare_tables(_table(), rerun, TOL)
    assert sorted(d.where.split("column ")[1] for d in drifts) == ["'#epoch'", "'method'", "'paper acc (%)'"]
    assert compare_tables(_table(), _table().iloc[:1], TOL)[0][0].where == "rows"


def test_fractions_compared_in_points() -> None:
    a = pd.DataFrame({"setting": ["x"], "test_accuracy": [0.8500]})
    assert compare_tables(a, a.assign(test_accuracy=[0.8590]), TOL)[0] == []
    assert len(compare_tables(a, a.assign(test_accuracy=[0.8611]), TOL)[0]) == 1


def test_fails_on_perturbed_committed_record(tmp_path: Path) -> None:
    committed = Path(__file__).resolve().parents[1] / "figures"
    rerun = tmp_path / "rerun"
    shutil.copytree(committed, rerun)
    assert compare_dirs(committed, rerun, TOL)[0] == []
    table = pd.read_csv(rerun / "main_table.csv")
    row = table.index[table["method"] == "greedy"][0]
    table.loc[row, "test acc (%)"] += 1.5
    table.to_csv(rerun / "main_table.csv", index=False)
    (rerun / "top_models.csv").unlink()
    drifts, _ = compare_dirs(committed, rerun, TOL)
    assert {(d.file, d.where.split(", column")[0].split(" (")[-1]) for d in drifts} == {
        ("main_table.csv", "method='greedy')"), ("top_models.csv", "file")}
    tol_file = tmp_path / "tol.csv"
    pd.DataFrame({"kind": ["accuracy"], "tolerance": [1.0]}).to_csv(tol_file, index=False)
    assert main(["check", str(committed), str(rerun), "--tolerances", str(tol_file)]) == 1
    assert main(["check", str(committed), str(committed), "--tolerances", str(tol_file)]) == 0


def test_derive_from_seed_spread_and_float_paths(tmp_path: Path) -> None:
    pd.DataFrame({"method": ["a", "b"], "sd over seeds (points)": [0.3, 0.4]}).to_csv(tmp_path / "s.csv", index=False)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _table().to_csv(a / "t.csv", index=False)
    _table().assign(**{"test acc (%)": [85.35, 87.10]}).to_csv(b / "t.csv", index=False)
    out = derive_tolerances(tmp_path / "s.csv", [(a, b)], tmp_path / "tol.csv").set_index("kind")
    # pooled sd sqrt((0.09 + 0.16) / 2) = 0.35355; 4 x = 1.414 -> 1.45; float paths: 2 x 1.0 = 2.0
    assert out.loc["accuracy", "tolerance"] == pytest.approx(2.0)
    assert out.loc["difference", "tolerance"] == pytest.approx(2.85)  # 8 x 0.35355 = 2.828 -> 2.85
    assert "statistic" not in out.index


def test_a_column_named_after_any_registered_method_is_an_accuracy() -> None:
    from soupkit.experiments.drift import column_kind

    values = pd.Series([83.25, 84.1])
    assert column_kind("Model Stock", values) == "accuracy"
    assert column_kind("Task arithmetic", values) == "accuracy"
    assert column_kind("something else", values) == "other"


def test_extra_notebooks_tables_left_out_unless_asked(tmp_path: Path) -> None:
    """`make test` and the default run leave out the EXTRA notebooks (10, 12): their committed tables are not
    compared, so a rerun without growing.csv or seeds_*.csv passes; --with-extra compares them (and fails)."""
    from soupkit.experiments.runner import EXTRA, EXTRA_TABLES

    assert set(EXTRA_TABLES) == set(EXTRA)
    committed = Path(__file__).resolve().parents[1] / "figures"
    for globs in EXTRA_TABLES.values():  # every glob names a committed table (a typo would exclude nothing)
        assert all(list(committed.glob(g)) for g in globs), globs
    rerun = tmp_path / "rerun"
    shutil.copytree(committed, rerun)
    for globs in EXTRA_TABLES.values():
        for g in globs:
            for p in rerun.glob(g):
                p.unlink()
    assert main(["check", str(committed), str(rerun)]) == 0
    assert main(["check", str(committed), str(rerun), "--with-extra"]) == 1
