"""benchmarks/gpu_check.py on CPU at its tiny sizes (``--quick``): every part runs, writes its CSV and the summary;
part 1 on one device is exact, and a check with tolerance 0 on a perturbed input fails."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import load_benchmark


PART_COLUMNS = {
    "part1_equality.csv": {"method", "device", "reference", "acc_reference", "acc_device", "max_abs_dcoef",
                           "d_correct", "coef_tol", "acc_tol_examples", "result"},
    "part2_memory.csv": {"method", "K", "b", "status", "peak_memory_bytes", "predicted_bytes",
                         "predicted_over_measured", "seconds_per_epoch", "checkpoint_dtype"},
    "part3_steps.csv": {"pair", "kind", "seconds", "step_ratio", "mehl_step_seconds", "plain_step_seconds"},
    "part4_drift.csv": {"method", "variant", "status", "acc_float32", "acc_variant", "d_acc_points",
                        "max_abs_dcoef", "coef_tol", "acc_tol_points", "result"},
}


@pytest.fixture(scope="module")
def gpu_check():
    """The entry script, loaded by path; it puts benchmarks/ on sys.path for its helper modules."""
    return load_benchmark("gpu_check")


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path) as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_quick_cpu_run_writes_every_part(gpu_check, tmp_path):
    summary = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)], log=lambda *a: None)
    assert summary["stopped"] is None and set(summary["part_seconds"]) == {"1", "2", "3", "4"}
    assert summary["gpu_result"] is False  # a CPU run never counts as a GPU result
    for name, wanted in PART_COLUMNS.items():
        columns, rows = _rows(tmp_path / name)
        assert wanted <= set(columns), (name, wanted - set(columns))
        assert rows, name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["checks"]["part1_equality"]["result"] == "PASS"
    assert saved["checks"]["part1_equality"]["coef_tol"] == 0.0  # CPU against CPU: exact
    _, part1 = _rows(tmp_path / "part1_equality.csv")
    from soupkit import METHODS

    assert sorted(r["method"] for r in part1) == sorted(METHODS)
    assert all(float(r["max_abs_dcoef"]) == 0.0 and r["d_correct"] == "0" for r in part1)
    _, part2 = _rows(tmp_path / "part2_memory.csv")
    assert {(r["method"], r["K"]) for r in part2} == {(m, k) for m in ("learned+", "mehl+") for k in ("2", "4")}
    assert all(r["status"] == "ok" and float(r["peak_memory_bytes"]) > 0 and float(r["predicted_bytes"]) > 0
               for r in part2)
    assert {r["checkpoint_dtype"] for r in part2} == {"float16"}
    _, part4 = _rows(tmp_path / "part4_drift.csv")
    assert len(part4) == 12 and sum(r["status"].startswith("not applicable") for r in part4) == 2
    for name in ("part2_runs", "part4_drift"):
        assert saved["checks"][name]["result"] == "PASS" and saved["checks"][name]["judged"]
    assert not saved["checks"]["part3_step_ratio"]["judged"]  # a ViT-B/32 target: reported, not judged here
    assert (tmp_path / "memory_vs_k.png").stat().st_size > 0
    assert not (tmp_path / "ckpt_tiny_10").exists()


def test_zero_tolerance_on_a_perturbed_input_fails(gpu_check, tmp_path):
    summary = gpu_check.main(["--device", "cpu", "--quick", "--parts", "1", "--part1-methods", "learned+", "mehl+",
                              "uniform", "--part1-coef-tol", "0", "--part1-perturb", "1e-3", "--out", str(tmp_path)],
                             log=lambda *a: None)
    check = summary["checks"]["part1_equality"]
    assert check["result"] == "FAIL" and summary["overall"] == "FAIL"
    assert check["failed"] == ["learned+", "mehl+"]  # uniform's coefficients do not read the data


def test_budget_stops_before_a_part_and_says_so(gpu_check, tmp_path):
    logged: list[str] = []
    summary = gpu_check.main(["--device", "cpu", "--quick", "--budget-s", "1", "--out", str(tmp_path)],
                             log=logged.append)
    assert summary["stopped"].startswith("stopping before part 1") and summary["part_seconds"] == {}
    assert all(summary["checks"][f"part{p}_not_run"]["result"] == "NOT RUN" for p in (1, 2, 3, 4))
    assert summary["overall"] == "FAIL" and any(line.startswith("BUDGET:") for line in logged)
