"""The claims table: verdicts decided by intervals, numbers read from result files."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from soupkit.experiments.claims import EQUIVALENCE_MARGIN, claims_markdown, claims_table, equivalence_verdict
from soupkit.experiments.stats import Interval


def test_equivalence_verdict_hand_cases() -> None:
    m = EQUIVALENCE_MARGIN
    assert equivalence_verdict(Interval(0.0, -m / 2, m / 2)) == "reproduces"
    assert equivalence_verdict(Interval(2 * m, 1.5 * m, 3 * m)) == "contradicted"
    assert equivalence_verdict(Interval(0.0, -2 * m, 2 * m)) == "cannot tell at this scale"


def _write_run(folder: Path, method: str, correct: np.ndarray, **record) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.zeros(len(correct), dtype=int)
    predicted = np.where(correct, 0, 1)
    (folder / f"{method}.predictions.csv").write_text(
        "label,prediction\n" + "".join(f"{y},{p}\n" for y, p in zip(labels, predicted)))
    (folder / f"{method}.json").write_text(json.dumps({"method": method, "status": "ok",
                                                       "test_accuracy": float(correct.mean()), **record}))


def test_table1_rows_from_predictions_and_seeds(tmp_path: Path) -> None:
    n = 400
    mehl = np.ones(n, dtype=bool)
    mehl[:20] = False                      # 95.0 %
    learned = np.ones(n, dtype=bool)
    learned[:60] = False                   # 85.0 %: MEHL+ better by 10 points on exactly 40 images
    for m, c in (("mehl+", mehl), ("learned+", learned)):
        _write_run(tmp_path / "main_table", m, c, peak_memory_bytes=100.0 if m == "learned+" else 50.0,
                   seconds_total=10.0)
    seeds = pd.DataFrame({"seed": [0, 0, 1, 1, 2, 2], "method": ["mehl+", "learned+"] * 3,
                          "test_accuracy": [0.90, 0.89, 0.91, 0.89, 0.92, 0.89]})
    (tmp_path / "seeds").mkdir()
    seeds.to_csv(tmp_path / "seeds" / "records.csv", index=False)
    table = claims_table(tmp_path, tmp_path / "figures", tmp_path / "seeds", pairs=[("mehl+", "learned+")])
    row = table.iloc[0]
    assert row["paper"] == "+0.23"          # 81.62 - 81.39, from soupkit/experiments/paper
    est = float(row["ours, one run (95 % CI over test images)"].split(" ")[0])
    assert est == pytest.approx(10.0)
    # per-seed differences 1, 2, 3 points: mean 2, t interval 2 +- 4.302653 / sqrt(3) = [-0.48, 4.48]
    assert row["ours, over seeds (95 % CI)"] == "+2.00 [-0.48, +4.48]"
    assert row["verdict"] == "cannot tell at this scale" and row["decided by"] == "seeds"
    memory = table[table["claim"].str.contains("peak memory")].iloc[0]
    assert memory["ours, one run (95 % CI over test images)"] == "2.00x"
    assert memory["verdict"] == "no verdict (one measurement)" and memory["decided by"] == "-"
    assert "| Table 1: MEHL-Soup+ more accurate than Learned-Soup+ (points) | +0.23 |" in claims_markdown(table)


def test_power_line_hand_case() -> None:
    from soupkit.experiments.claims import power_line

    comparisons = pd.DataFrame([{"a": "mehl+", "b": "greedy", "seeds": 3, "mean difference (points)": 2.0,
                                 "t half-width (points)": 2.484, "image half-width (points)": 0.6,
                                 "seed 0 (points)": 1.0, "seed 1 (points)": 2.0, "seed 2 (points)": 3.0}])
    line = power_line(comparisons, target=2.5)
    # sd 1.0; t(2) * 1 / sqrt(3) = 2.484 <= 2.5: 3 seeds suffice
    assert "±2.48 (within the ±2.5 target)" in line and "needs 3 seeds" in line and "sd 1.00" in line
    assert "needs 4 seeds" in power_line(comparisons, target=2.4)
    assert "power not assessed" in power_line(comparisons, "hl+", "greedy")


def test_the_benchmark_row_comes_from_the_file_passed_only(tmp_path: Path) -> None:
    bench = Path(__file__).resolve().parents[1] / "data" / "results" / "benchmark_cpu.csv"
    name = "Learned-Soup+ / MEHL-Soup+ peak memory at ViT-B/32 size"
    without = claims_table(tmp_path, tmp_path / "figures", None, pairs=[])
    assert len(without) and not without["claim"].str.startswith(name).any()
    row = claims_table(tmp_path, tmp_path / "figures", None, bench, pairs=[]).iloc[-1]
    assert row["claim"].startswith(name) and bench.name in row["basis"]
    assert row["verdict"] == "no verdict (one measurement)"


def test_comparison_verdict_names_the_better_method() -> None:
    from soupkit.experiments.claims import comparison_verdict

    assert comparison_verdict(Interval(1.0, 0.2, 1.8), "mehl+", "model_stock") == "MEHL-Soup+ better"
    assert comparison_verdict(Interval(-1.0, -1.8, -0.2), "mehl+", "model_stock") == "Model Stock better"
    assert comparison_verdict(Interval(0.1, -0.5, 0.7), "mehl+", "model_stock") == "cannot tell at this scale"


def _write_shift(folder: Path, method: str, shift: str, correct: np.ndarray) -> None:
    predicted = np.where(correct, 0, 1)
    (folder / f"{method}.shift-{shift}.predictions.csv").write_text(
        "label,prediction\n" + "".join(f"0,{p}\n" for p in predicted))
    record = json.loads((folder / f"{method}.json").read_text())
    record[f"shift_{shift}_accuracy"] = float(correct.mean())
    (folder / f"{method}.json").write_text(json.dumps(record))


def test_shift_and_beyond_rows_from_the_main_tables_predictions(tmp_path: Path) -> None:
    folder, n = tmp_path / "main_table", 200
    test = {"greedy": 0.9, "best": 0.9, "uniform": 0.9, "mehl+": 0.95, "model_stock": 0.8}
    for m, acc in test.items():
        _write_run(folder, m, np.arange(n) < acc * n)
    # greedy above best by 10 points on shift a and by 0 on shift b (a different size): average +5 points
    for m, (a, b) in {"greedy": (0.8, 0.5), "best": (0.7, 0.5), "uniform": (0.8, 0.5), "mehl+": (0.8, 0.5)}.items():
        _write_shift(folder, m, "a", np.arange(n) < a * n)
        _write_shift(folder, m, "b", np.arange(100) < b * 100)
    table = claims_table(tmp_path, tmp_path / "figures", pairs=[]).set_index("claim")
    robust = table.loc["model-soups: Greedy-Soup more robust than Best individual model (shift average, points)"]
    assert robust["ours, one run (95 % CI over test images)"].startswith("+5.00 [")
    assert robust["verdict"] == "reproduces" and robust["paper"] == "+2.89 (ImageNet shifts)"
    same = table.loc["model-soups: Uniform-Soup more robust than Greedy-Soup (shift average, points)"]
    assert same["ours, one run (95 % CI over test images)"] == "+0.00 [+0.00, +0.00]"
    assert same["verdict"] == "cannot tell at this scale"
    beyond = table.loc["Beyond the paper: MEHL-Soup+ vs Model Stock (points, A − B)"]
    assert beyond["ours, one run (95 % CI over test images)"].startswith("+15.00 [")
    assert beyond["verdict"] == "MEHL-Soup+ better"
    assert not any("Task arithmetic" in c for c in table.index)  # not run: no row
