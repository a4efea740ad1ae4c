"""The studies of notebooks 04 / 06 / 08: which models remain, the growing zoo and its cost, the held-out sweep."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from soupkit.zoo.embedded_models import ViTConfig  # noqa: E402
from soupkit.experiments.results import paper_table, read_csv  # noqa: E402
from soupkit.experiments.run import read_correct  # noqa: E402
from soupkit.methods.result import SoupResult  # noqa: E402
from soupkit.experiments.params import parse_list  # noqa: E402
from soupkit.experiments.stats import bootstrap_accuracy  # noqa: E402
from soupkit.experiments.studies import (cost_to_reach, finetuning_cost_study, growing_zoo, heldout_size_study,
                                         heldout_size_table, plot_finetuning_cost, plot_heldout_size,
                                         plot_top_models, remaining_after_top, scaled_counts, top_models_study,
                                         top_models_table)
from soupkit.zoo.config import ZooConfig
from soupkit.zoo.build import build_zoo  # noqa: E402

TINY = ZooConfig(k=4, model=ViTConfig(width=32, layers=1, heads=2, output_dim=16), batch_size=64,
                 pretrain_epochs=1, lp_steps=5, epoch_choices=(1,), max_pretrain=128, max_finetune=128, max_eval=100)
FAST = {"mehl+": {"epochs": 1.0, "model_batch_size": 2}, "learned+": {"epochs": 1.0}}


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo"), TINY, progress=False, num_threads=1)


def test_parse_list():
    assert parse_list("0, 22,42") == [0, 22, 42]
    assert parse_list("250,4000,") == [250, 4000]
    assert parse_list("0.5, 1", float) == [0.5, 1.0]


def test_scaled_counts_follow_the_paper():
    assert scaled_counts([0, 2, 22, 42], 72) == [0, 2, 22, 42]  # the paper's own zoo: unchanged
    assert scaled_counts([0, 2, 22, 42], 32) == [0, 1, 10, 19]
    assert scaled_counts([0, 42, 71], 4) == [0, 2, 3]  # never all the models
    with pytest.raises(ValueError):
        scaled_counts([72], 32)


def test_remaining_after_top_removes_exactly_the_top_n():
    accs = [0.80, 0.90, 0.85, 0.90, 0.70, 0.88]
    assert remaining_after_top(accs, 0) == (0, 1, 2, 3, 4, 5)
    assert remaining_after_top(accs, 1) == (0, 2, 3, 4, 5)  # tie at 0.90: index 1 ranks first, as greedy sorts
    assert remaining_after_top(accs, 3) == (0, 2, 4)
    rng = np.random.default_rng(0)
    for n in range(10):
        accs = rng.random(10).round(1).tolist()
        left = remaining_after_top(accs, n)
        gone = sorted(set(range(10)) - set(left))
        assert len(gone) == n and list(left) == sorted(left)
        assert all(accs[g] >= accs[r] for g in gone for r in left)
    with pytest.raises(ValueError):
        remaining_after_top(accs, 10)


def test_growing_zoo_costs_are_cumulative():
    seconds = [5.0, 6.5, 4.0, 7.25]
    grow = growing_zoo(seconds, [1, 2, 4])
    assert grow["finetune_seconds"].tolist() == [5.0, 11.5, 22.75]
    assert grow["models"].tolist() == [(0,), (0, 1), (0, 1, 2, 3)]
    with pytest.raises(ValueError):
        growing_zoo(seconds, [0, 5])


def test_cost_to_reach():
    records = pd.DataFrame({"method": ["greedy"] * 3 + ["mehl+"] * 3, "finetune_seconds": [10, 20, 40] * 2,
                            "test_accuracy": [0.80, 0.82, 0.84, 0.81, 0.84, 0.83]})
    records["num_finetuned"] = [2, 4, 8] * 2
    reach = cost_to_reach(records, 0.84).set_index("method")
    assert reach["finetune_seconds"].to_dict() == {"greedy": 40, "mehl+": 20}
    assert reach["num_finetuned"].to_dict() == {"greedy": 8, "mehl+": 4}
    assert cost_to_reach(records, 0.9)["finetune_seconds"].isna().all()


def _check_intervals(records: pd.DataFrame) -> None:
    """Each record's test_low / test_high are the bootstrap of its predictions file and contain its accuracy."""
    for row in records.itertuples():
        correct = read_correct(row.record_path)
        assert correct.mean() == pytest.approx(row.test_accuracy, abs=1e-6)
        expected = bootstrap_accuracy(correct)
        assert (row.test_low, row.test_high) == pytest.approx((expected.low, expected.high))
        assert row.test_low <= row.test_accuracy <= row.test_high


def test_top_models_study_eliminates_the_heldout_best(tiny_zoo, tmp_path):
    out = tmp_path / "top"
    records = top_models_study(tiny_zoo.out_dir, out, [0, 2, 2], methods=("greedy", "mehl+"), options=FAST,
                               paper_counts=[0, 42, 60], heldout_size=50)
    assert len(records) == 4  # the repeated count ran once
    accs = SoupResult.load(out / "best").stats["heldout_accuracies"]
    assert len(accs) == 4
    for row in records.itertuples():
        left = set(row.models)
        gone = set(range(4)) - left
        assert len(gone) == row.eliminated and row.num_models == 4 - row.eliminated
        assert all(accs[g] >= accs[r] for g in gone for r in left)
        if row.method == "greedy":
            assert set(row.chosen) <= left
    saved = read_csv(out / "records.csv")
    assert saved["eliminated"].tolist() == [0, 0, 2, 2] and saved["paper_eliminated"].tolist() == [0, 0, 42, 42]
    _check_intervals(saved)
    table = top_models_table(saved, paper_table("table3_top_models"))
    assert table["models left"].tolist() == [4, 2]
    assert table["paper Greedy-Soup (%)"].tolist() == [81.03, 79.70]
    assert table["Greedy-Soup (%)"].tolist() == pytest.approx(100 * saved.query("method == 'greedy'")["test_accuracy"])
    assert table["Greedy-Soup low (%)"].tolist() == pytest.approx(100 * saved.query("method == 'greedy'")["test_low"])
    assert list(table.columns[3:6]) == ["Greedy-Soup (%)", "Greedy-Soup low (%)", "Greedy-Soup high (%)"]
    assert (table["MEHL-Soup+ low (%)"] <= table["MEHL-Soup+ (%)"]).all()
    assert (table["MEHL-Soup+ (%)"] <= table["MEHL-Soup+ high (%)"]).all()
    fig = plot_top_models(saved, "tiny", paper_table("table3_top_models"))
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2
    assert len(fig.axes[0].collections) == 2  # one 95 % band per method (ours), none for the paper
    # records without bounds (an older records.csv) get them from their record_path
    again = top_models_table(saved.drop(columns=["test_low", "test_high"]))
    assert again["Greedy-Soup high (%)"].tolist() == pytest.approx(table["Greedy-Soup high (%)"].tolist())


def test_finetuning_cost_study_uses_the_zoo_seconds(tiny_zoo, tmp_path):
    records = finetuning_cost_study(tiny_zoo.out_dir, tmp_path, [1, 3], methods=("greedy",), heldout_size=40)
    seconds = [r["finetune_seconds"] for r in tiny_zoo.records]
    assert records["finetune_seconds"].tolist() == pytest.approx([seconds[0], sum(seconds[:3])])
    assert records["num_models"].tolist() == [1, 3] and records["models"].tolist() == [(0,), (0, 1, 2)]
    assert read_csv(tmp_path / "records.csv")["finetune_seconds"].is_monotonic_increasing
    _check_intervals(records)
    fig = plot_finetuning_cost(records, "tiny", target=0.5)
    assert len(fig.axes[0].lines) == 2  # one method + the target level
    assert len(fig.axes[0].collections) == 1  # its 95 % band
    # a zoo without recorded times (model-soups' release) needs an assumed cost per model
    assumed = finetuning_cost_study(tiny_zoo.out_dir, tmp_path / "assumed", [2], methods=("greedy",),
                                    heldout_size=40, seconds_per_model=100.0)
    assert assumed["finetune_seconds"].tolist() == [200.0]


def test_b_above_the_number_of_models_is_one_block_without_a_warning(tiny_zoo, tmp_path):
    import warnings

    options = {"mehl+": {"model_batch_size": 8, "epochs": 1.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        records = finetuning_cost_study(tiny_zoo.out_dir, tmp_path, [2], methods=("mehl+",), options=options,
                                        heldout_size=40)
    assert records["status"].tolist() == ["ok"] and records["num_models"].tolist() == [2]


def test_heldout_size_study_passes_each_size(tiny_zoo, tmp_path):
    records = heldout_size_study(tiny_zoo.out_dir, tmp_path, [20, 60], methods=("greedy", "learned+"), options=FAST)
    assert records["heldout_size"].tolist() == [20, 20, 60, 60]
    for row in records.itertuples():  # accuracy measured on exactly n images: a multiple of 1/n
        assert row.heldout_accuracy * row.heldout_size == pytest.approx(round(row.heldout_accuracy * row.heldout_size),
                                                                        abs=1e-3)
    assert (tmp_path / "heldout60" / "learned+.json").is_file()
    saved = read_csv(tmp_path / "records.csv")
    _check_intervals(saved)
    table = heldout_size_table(saved)
    assert table["heldout_size"].tolist() == [20, 60]
    assert list(table.columns[1:5]) == ["Greedy-Soup test (%)", "Greedy-Soup test low (%)", "Greedy-Soup test high (%)",
                                        "Greedy-Soup held-out (%)"]
    assert table["Learned-Soup+ test high (%)"].tolist() == pytest.approx(
        100 * saved.query("method == 'learned+'")["test_high"])
    fig = plot_heldout_size(records, "tiny")
    assert len(fig.axes[0].lines) == 4  # test and held-out per method
    assert len(fig.axes[0].collections) == 2  # a 95 % band around each test line


def test_tables_and_figures_without_intervals_keep_working():
    # records with no predictions (older runs, runs that did not fit): NaN bounds, lines without bands
    records = pd.DataFrame({"method": ["greedy", "mehl+"] * 2, "heldout_size": [20, 20, 60, 60],
                            "test_accuracy": [0.8, 0.82, 0.81, None], "heldout_accuracy": [0.9, 0.92, 0.85, None],
                            "status": ["ok", "ok", "ok", "did not fit"]})
    table = heldout_size_table(records)
    assert table.filter(like=" low (%)").isna().all().all()
    assert table["MEHL-Soup+ test (%)"].isna().tolist() == [False, True]
    fig = plot_heldout_size(records, "tiny")
    assert len(fig.axes[0].collections) == 0
    # one run with an interval among runs without: an error bar, not a band of one point
    records["test_low"], records["test_high"] = [0.78, None, None, None], [0.82, None, None, None]
    fig = plot_heldout_size(records, "tiny")
    assert len(fig.axes[0].collections) >= 1
