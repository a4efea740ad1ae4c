"""Notebook 12's study (``soupkit.experiments.growing``): grown and scratch runs per size, the first grown record is
the scratch one, a re-run skips what is done, and the table's difference is the paired one of the predictions."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from soupkit.errors import SoupkitError
from soupkit.experiments import growing
from soupkit.errors import GrowingError
from soupkit.experiments.growing import growing_specs, growing_study, record_path, result_dir
from soupkit.experiments.run import read_correct, write_predictions
from soupkit.experiments.stats import paired_difference

N = 200  # test images of the fake runs


def _fake_runner(calls: list, seconds: dict | None = None):
    """A runner that writes what run_method writes (record, predictions, result folder) without a soup: the
    predictions are drawn from the spec (size and whether it was grown), so every run differs."""

    def run(spec):
        k, grown = len(spec.models), "warm_start" in spec.options
        calls.append((k, grown))
        g = torch.Generator().manual_seed(10 * k + grown)
        labels = torch.randint(0, 3, (N,), generator=g)
        predicted = torch.where(torch.rand(N, generator=g) < 0.7 + 0.05 * grown, labels, (labels + 1) % 3)
        write_predictions(spec.record, labels, predicted)
        Path(spec.save_dir).mkdir(parents=True, exist_ok=True)
        (Path(spec.save_dir) / "result.json").write_text("{}")
        record = {"method": spec.method, "status": "ok", "num_models": k, "options": spec.options,
                  "test_accuracy": float((labels == predicted).float().mean()), "test_images": N,
                  "heldout_accuracy": 0.5, "seconds_total": (seconds or {}).get((k, grown), float(k)),
                  "peak_memory_bytes": 2 ** 20 * k}
        Path(spec.record).write_text(json.dumps(record))
        return record

    return run


@pytest.fixture
def fake_zoo(monkeypatch):
    monkeypatch.setattr(growing, "open_zoo", lambda path: SimpleNamespace(records=[{}] * 16))
    return "zoo"


def test_specs_grow_from_the_previous_grown_result_with_b_at_most_k(tmp_path):
    specs = growing_specs("zoo", tmp_path, [8, 4, 16], "mehl+", model_batch_size=8, heldout_size=100)
    assert [(k, mode) for k, mode, _ in specs] == [(4, "scratch"), (4, "grown"), (8, "scratch"), (8, "grown"),
                                                  (16, "scratch"), (16, "grown")]
    assert specs[1][2] is None  # the first grown run is the scratch one
    by = {(k, mode): s for k, mode, s in specs}
    assert by[4, "scratch"].options["model_batch_size"] == 4 and by[16, "grown"].options["model_batch_size"] == 8
    assert by[8, "grown"].options["warm_start"] == str(result_dir(tmp_path, "grown", 4))
    assert by[16, "grown"].options["warm_start"] == str(result_dir(tmp_path, "grown", 8))
    assert "warm_start" not in by[16, "scratch"].options and by[16, "scratch"].models == tuple(range(16))
    assert all(s.heldout_size == 100 for s in by.values() if s is not None)
    json.dumps([s.options for s in by.values() if s is not None])  # scalars: they cross to a subprocess


def test_only_mehl_can_be_grown_and_sizes_are_checked(tmp_path):
    with pytest.raises(GrowingError, match="cannot be grown.*mehl, mehl\\+"):
        growing_specs("zoo", tmp_path, [4, 8], "greedy")
    with pytest.raises(GrowingError, match="at least 2 models"):
        growing_specs("zoo", tmp_path, [1, 4], "mehl+")
    assert issubclass(GrowingError, SoupkitError)


def test_the_first_grown_record_is_the_scratch_one_and_a_rerun_skips_what_is_done(tmp_path, fake_zoo):
    calls: list = []
    table = growing_study(fake_zoo, tmp_path, (4, 8, 32), runner=_fake_runner(calls))
    assert calls == [(4, False), (8, False), (8, True), (16, False), (16, True)]  # 32 capped at the zoo's 16
    scratch, grown = (json.loads(record_path(tmp_path, m, 4).read_text()) for m in ("scratch", "grown"))
    assert grown.pop("same_as") == "scratch_4.json" and grown.pop("mode") == "grown"
    assert grown == scratch
    assert np.array_equal(read_correct(record_path(tmp_path, "grown", 4)), read_correct(record_path(tmp_path, "scratch", 4)))
    first = table[table["size"] == 4].set_index("mode")
    assert first.loc["grown", "difference"] == 0 and first.loc["grown", "test_accuracy"] == first.loc["scratch", "test_accuracy"]

    again: list = []
    growing_study(fake_zoo, tmp_path, (4, 8, 16), runner=_fake_runner(again))
    assert again == []  # every (size, mode) has its ok record
    record_path(tmp_path, "grown", 16).write_text(json.dumps({"status": "did not fit"}))
    growing_study(fake_zoo, tmp_path, (4, 8, 16), runner=_fake_runner(again))
    assert again == [(16, True)]  # only what is not ok runs again


def test_the_table_has_intervals_paired_differences_and_cumulative_seconds(tmp_path, fake_zoo):
    seconds = {(4, False): 10.0, (8, False): 20.0, (8, True): 6.0, (16, False): 40.0, (16, True): 7.0}
    table = growing_study(fake_zoo, tmp_path, (4, 8, 16), runner=_fake_runner([], seconds))
    assert list(table.columns) == ["size", "mode", "method", "status", "test_accuracy", "heldout_accuracy", "seconds",
                                   "cumulative_seconds", "peak_memory_mb", "record_path", "test_low", "test_high",
                                   "difference", "difference_low", "difference_high"]
    assert (tmp_path / "records.csv").is_file() and len(table) == 6
    rows = table.set_index(["size", "mode"])
    assert rows["cumulative_seconds"].tolist() == [10.0, 10.0, 20.0, 16.0, 40.0, 23.0]
    assert rows.loc[(16, "grown"), "peak_memory_mb"] == 16
    assert (rows["test_low"] <= rows["test_accuracy"]).all() and (rows["test_accuracy"] <= rows["test_high"]).all()
    expected = paired_difference(read_correct(record_path(tmp_path, "grown", 8)),
                                 read_correct(record_path(tmp_path, "scratch", 8)))
    got = rows.loc[(8, "grown")]
    assert (got["difference"], got["difference_low"], got["difference_high"]) == pytest.approx(tuple(expected[:3]))
    assert got["difference"] != 0 and np.isnan(rows.loc[(8, "scratch"), "difference"])


def test_plot_growing_draws_three_panels(tmp_path, fake_zoo):
    import matplotlib.pyplot as plt

    from soupkit.experiments.plots import plot_growing

    fig = plot_growing(growing_study(fake_zoo, tmp_path, (4, 8), runner=_fake_runner([])), "toy")
    assert len(fig.axes) == 3 and all(ax.get_legend() is not None for ax in fig.axes)
    plt.close(fig)
