"""Smoke test of benchmarks/memory_time.py and its helper modules on a tiny open_clip ViT (width 32, 1 layer,
32 px), K = 2."""
from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """The entry script, loaded by path; it puts benchmarks/ on sys.path for its helper modules."""
    return load_benchmark("memory_time")


def _helper(name: str):
    """benchmarks/<name>.py, imported by name as the entry script imports it (the same module object)."""
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve() == ROOT / "benchmarks" / f"{name}.py"
    return module


@pytest.fixture(scope="module")
def bench_common(bench):
    return _helper("_bench_common")


@pytest.fixture(scope="module")
def launcher_module(bench):
    return _helper("_bench_launcher")


@pytest.fixture(scope="module")
def sweep(bench):
    return _helper("memory_time_sweep")


@pytest.fixture(scope="module")
def analysis(bench):
    return _helper("memory_time_analysis")


TINY = ["--device", "cpu", "--arch", "tiny", "--num-classes", "10", "--b", "2", "--inner-iterations", "2",
        "--heldout", "4", "--batch", "2", "--step-batch", "2", "--step-warmup", "1", "--step-pairs", "2"]


def test_in_process_run_writes_csv_summary_and_figure(bench, bench_common, tmp_path):
    summary = bench.main(TINY + ["--ks", "2", "--no-isolate", "--out", str(tmp_path)], log=lambda *a: None)
    with open(summary["csv"]) as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == bench_common.CSV_COLUMNS
        rows = list(reader)
    assert sorted(r["method"] for r in rows) == sorted(bench_common.METHODS)
    for r in rows:
        assert r["status"] == "ok" and r["K"] == "2"
        for col in ("seconds_total", "seconds_per_epoch", "epochs", "num_parameters", "model_bytes",
                    "start_rss_bytes"):
            assert float(r[col]) > 0, (r["method"], col, r[col])
        # in-process, a tiny model's ~100 KB peak can fit in heap this pytest process already holds (RSS does not
        # grow, so the peak above the start reads 0; seen once in a full run): > 0 is checked in fresh processes
        assert float(r["peak_memory_bytes"]) >= 0, (r["method"], r["peak_memory_bytes"])
        assert r["device"] == "cpu" and r["torch_version"] and r["device_name"]
    assert next(r for r in rows if r["method"] == "mehl+")["model_batch_size"] == "2"
    saved = json.loads((tmp_path / "summary_cpu.json").read_text())
    assert saved["steps"]["mehl_step_seconds"] > 0 and saved["steps"]["plain_step_seconds"] > 0
    assert set(saved["targets"]) == {"mehl_flat", "memory_ratio_K72", "step_ratio"}
    assert saved["targets"]["memory_ratio_K72"]["result"] == "NOT MEASURED"  # one K: no line to extrapolate
    assert (tmp_path / "benchmark_memory_vs_k_cpu.png").stat().st_size > 0
    assert not (tmp_path / "ckpt_tiny_10").exists()  # checkpoints removed unless --keep-checkpoints


def test_fresh_process_measurements(bench_common, launcher_module, sweep, tmp_path):
    model = bench_common.build_model("tiny", 10)
    paths = bench_common.make_checkpoints(model, 2, tmp_path / "ckpt")
    assert bench_common.make_checkpoints(model, 2, tmp_path / "ckpt") == paths  # reused, same manifest
    common = dict(arch="tiny", num_classes=10, device="cpu", b=2, inner_iterations=1, heldout_images=2,
                  batch_size=2, seed=0)
    assert launcher_module.WORKER_SCRIPT == ROOT / "benchmarks" / "memory_time.py"  # its __main__ runs the workers
    with launcher_module.Launcher(bench_common.MALLOC_ENV["live"]) as launcher:
        rows = sweep.run_sweep(paths, ["mehl+", "nonsense"], [2], cap_bytes=2**40, launcher=launcher, timeout=300,
                               log=lambda *a: None, mehl_blocks=1, threads=1, **common)
        again = sweep.run_sweep(paths, ["learned+"], [2], cap_bytes=2**40, launcher=launcher, timeout=300,
                                log=lambda *a: None, threads=1, **common)  # the template survived a failed run
        third, err = launcher.run({"kind": "soup", "method": "hl+", "k": 2, "paths": [str(p) for p in paths],
                                   "threads": 1, **common}, 300)
        template = launcher.proc.pid
    assert err == "" and third["status"] == "ok"
    pids = {rows[0]["pid"], again[0]["pid"], third["pid"]}
    assert len(pids) == 3 and template not in pids and os.getpid() not in pids  # a fresh process per run
    row, failed = rows
    assert row["status"] == "ok", row
    assert row["peak_memory_bytes"] > 0 and row["seconds_per_epoch"] > 0 and row["outer_iterations"] == 1
    assert row["malloc"].startswith("live") and row["memory_source"] and row["threads"] == 1
    assert failed["status"].startswith("failed") and "nonsense" in failed["status"]
    assert again[0]["status"] == "ok" and again[0]["method"] == "learned+" and again[0]["malloc"].startswith("live")
    merged = sweep.merge(rows[:1], [{**row, "seconds_per_epoch": 3.0, "peak_memory_bytes": 7}])
    assert merged[0]["seconds_per_epoch"] == 3.0 and merged[0]["peak_memory_bytes"] == row["peak_memory_bytes"]
    assert merged[0]["peak_memory_bytes_default_malloc"] == 7 and merged[0]["time_status"] == "ok"


def test_fits_projection_and_targets(analysis, sweep):
    assert analysis.linear_fit([(2, 3.0), (4, 5.0), (8, 9.0)]) == pytest.approx({"intercept": 1.0, "slope": 1.0})
    assert analysis.linear_fit([(2, 1.0)]) is None
    assert sweep._project([(2, 10), (4, 20)], 8) == 40
    assert sweep._project([(4, 10)], 8) == 20
    rows = [{"method": m, "K": k, "status": "ok", "peak_memory_bytes": v, "seconds_per_epoch": 1.0}
            for m, pts in {"learned+": [(8, 10), (16, 18)], "mehl+": [(8, 5), (16, 5)]}.items() for k, v in pts]
    summary = analysis.analyse(rows, {"step_ratio": 1.5, "ratio_of_medians": 1.5, "mehl_step_seconds": 1.5,
                                   "plain_step_seconds": 1.0})
    t = summary["targets"]
    assert t["mehl_flat"]["result"] == "PASS"
    assert t["memory_ratio_K72"]["value"] == pytest.approx((2 + 72) / 5)  # learned+: 2 + K
    assert t["memory_ratio_K72"]["result"] == "PASS (extrapolated)" and "EXTRAPOLATED" in t["memory_ratio_K72"]["how"]
    assert t["step_ratio"]["result"] == "MISS"


def test_plot_only_redraws_the_figure_from_a_csv(bench, tmp_path):
    csv_path, png = ROOT / "data" / "results" / "benchmark_cpu.csv", tmp_path / "b.png"
    logged = []
    out = bench.main(["--plot-only", str(csv_path), "--plot-out", str(png)], log=logged.append)
    assert out == {"figure": str(png), "csv": str(csv_path)} and png.stat().st_size > 0
    assert logged == [f"redrew {png} from {csv_path}"]  # nothing measured
