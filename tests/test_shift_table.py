"""Soups evaluated on distribution shifts: the run's record fields and prediction files, the shift table and the
main table's shift average with their intervals (tiny BatchNorm nets, seconds)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import BNNet, batches, make_data, save_files
from soupkit.experiments.results import main_table, shift_table
from soupkit.experiments.run import RunSpec, _run_on, read_correct
from soupkit.experiments.stats import bootstrap_accuracy, mean_over_sets
from soupkit.zoo.shifts import ShiftInfo


@dataclass
class _ShiftZoo:
    """A zoo with two shifts: ``noisy`` (the model's 3 classes) and ``pair`` (a subset: classes 0 and 2)."""

    paths: list
    pretrained_path: Path | None = None

    @property
    def records(self):
        return tuple({"index": i} for i in range(len(self.paths)))

    def make_model(self):
        return BNNet()

    def shift_names(self):
        return ("noisy", "pair")

    def shift_info(self, name):
        return ShiftInfo(name, 3) if name == "noisy" else ShiftInfo(name, 3, ((0,), (2,)))

    def shift_loader(self, name, eval_batch_size=500):
        x, y = make_data(n=120, seed=7)
        if name == "noisy":
            return batches(x + 0.8 * make_data(n=120, seed=8)[0], y)
        keep = y != 1
        return batches(x[keep], (y[keep] == 2).long())  # labels in the subset's 0..1


@pytest.fixture()
def shift_records(bn_setup, tmp_path):
    _, states, _ = bn_setup
    zoo = _ShiftZoo(save_files(states, tmp_path))
    x, y = make_data(seed=3)
    loaders = {"learn": batches(x, y), "heldout": batches(x, y), "test": batches(x, y), "select": None}
    records = [_run_on(RunSpec("zoo", m, str(tmp_path / f"{m}.json"), shifts=True), zoo, loaders, False)
               for m in ("uniform", "greedy")]
    plain = _run_on(RunSpec("zoo", "uniform", str(tmp_path / "plain" / "uniform.json")), zoo, loaders, False)
    return records, plain, tmp_path


def test_a_run_with_shifts_records_each_shift_and_its_predictions(shift_records):
    records, plain, folder = shift_records
    for r in records:
        for name, n in (("noisy", 120), ("pair", None)):
            correct = read_correct(folder / f"{r['method']}.json", f"shift-{name}")
            assert r[f"shift_{name}_images"] == correct.size and (n is None or correct.size == n)
            assert r[f"shift_{name}_accuracy"] == correct.sum() / correct.size
    assert r["shift_pair_images"] < 120  # the subset dropped class 1
    assert not any(k.startswith("shift_") for k in plain)  # off by default


def test_the_shift_table_carries_each_shift_and_the_average_with_intervals(shift_records):
    records, plain, folder = shift_records
    table = shift_table(records, folder).set_index("method")
    for r in records:
        row = table.loc[r["method"]]
        sets = [read_correct(folder / f"{r['method']}.json", f"shift-{s}") for s in ("noisy", "pair")]
        noisy = bootstrap_accuracy(sets[0]).scaled(100)
        assert row["noisy acc (%)"] == pytest.approx(100 * r["shift_noisy_accuracy"])
        assert (row["noisy low (%)"], row["noisy high (%)"]) == pytest.approx((noisy.low, noisy.high))
        avg = mean_over_sets(sets).scaled(100)
        assert row["shift avg (%)"] == pytest.approx((100 * r["shift_noisy_accuracy"] + 100 * r["shift_pair_accuracy"]) / 2)
        assert (row["shift avg low (%)"], row["shift avg high (%)"]) == pytest.approx((avg.low, avg.high))
        assert row["shift avg low (%)"] <= row["shift avg (%)"] <= row["shift avg high (%)"]
    main = main_table(records, record_dir=folder).set_index("method")
    assert main["shift avg (%)"].to_dict() == table["shift avg (%)"].to_dict()
    # records never evaluated on shifts: no shift table and no shift columns in the main table
    assert shift_table([plain], folder / "plain") is None
    assert "shift avg (%)" not in main_table([plain], record_dir=folder / "plain").columns


def test_a_missing_shift_predictions_file_leaves_that_interval_empty(shift_records):
    records, _, folder = shift_records
    (folder / "greedy.shift-pair.predictions.csv").unlink()
    row = shift_table(records, folder).set_index("method").loc["greedy"]
    assert np.isnan(row["pair low (%)"]) and np.isnan(row["shift avg (%)"]) and not np.isnan(row["noisy low (%)"])
