"""soupkit.experiments.seeds: the multi-seed tables on hand-made records, a tiny seed study end to end (seconds), the seeded
split of a zoo, and the runner's EXTRA / ``only`` mechanism that keeps notebook 10 out of the default presets."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from pathlib import Path
from scipy.stats import t

from soupkit.experiments import runner
from soupkit.zoo import build as zoo_mod
from soupkit.zoo.embedded_data import read_split_file
from soupkit.experiments.run import write_predictions
from soupkit.zoo.embedded_models import ViTConfig
from soupkit.experiments.seeds import (read_seed_records, seed_comparisons, seed_study, seed_summary, seed_zoo_config,
                                       seed_zoo_table)
from soupkit.experiments.stats import paired_difference
from soupkit.errors import ZooMismatchError
from soupkit.zoo.config import ZooConfig
from soupkit.zoo.build import build_zoo, load_zoo

T2 = t.ppf(0.975, 2)  # Student's t, 2 degrees of freedom (3 seeds): 4.3027


# ---- the tables, on hand-made records ---------------------------------------------------------------------
def _write(tmp_path, seed: int, method: str, correct: np.ndarray) -> str:
    """A record JSON and its predictions file: labels all 0, prediction 0 where ``correct``."""
    record = tmp_path / f"seed_{seed}" / f"{method}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"method": method, "seed": seed}))
    import torch

    labels = torch.zeros(len(correct), dtype=torch.long)
    write_predictions(record, labels, torch.from_numpy((~correct).astype(np.int64)))
    return str(record)


@pytest.fixture
def hand_records(tmp_path):
    """3 seeds x 3 methods on 100 test images: a right on 90 / 92 / 91, b on 80 each (a subset of a's), c = b."""
    rows = []
    for seed, n_a in [(0, 90), (1, 92), (2, 91)]:
        a = np.arange(100) < n_a          # a is right on the first n_a images
        b = np.arange(100) < 80           # b on the first 80: a is right wherever b is, and on n_a - 80 more
        for method, correct in [("a", a), ("b", b), ("c", b.copy())]:
            rows.append({"seed": seed, "method": method, "status": "ok", "test_accuracy": correct.mean(),
                         "heldout_accuracy": correct.mean() + 0.01, "record": _write(tmp_path, seed, method, correct)})
    rows.append({"seed": 3, "method": "a", "status": "did not fit", "test_accuracy": None,
                 "heldout_accuracy": None, "record": "missing.json"})  # left out everywhere
    return pd.DataFrame(rows)


def test_seed_summary_means_and_t_intervals(hand_records):
    summary = seed_summary(hand_records).set_index("method")
    assert list(summary.index) == ["a", "b", "c"]
    a = summary.loc["a"]
    assert a["seeds"] == 3 and a["mean test acc (%)"] == pytest.approx(91.0)
    half = T2 * 1.0 / math.sqrt(3)  # sd over seeds of 90, 92, 91 is 1 point
    assert a["t half-width (points)"] == pytest.approx(half)
    assert (a["t low (%)"], a["t high (%)"]) == pytest.approx((91.0 - half, 91.0 + half))
    assert a["sd over seeds (points)"] == pytest.approx(1.0)
    assert (a["min (%)"], a["max (%)"]) == (pytest.approx(90.0), pytest.approx(92.0))
    assert a["mean held-out acc (%)"] == pytest.approx(92.0)
    b = summary.loc["b"]  # the same accuracy on every seed: an interval of width 0
    assert (b["mean test acc (%)"], b["t low (%)"], b["t high (%)"]) == pytest.approx((80.0, 80.0, 80.0))


def test_seed_comparisons_paired_over_seeds_and_images(hand_records):
    table = seed_comparisons(hand_records, [("a", "b"), ("b", "a"), ("b", "c"), ("a", "nope")]).set_index(["a", "b"])
    assert len(table) == 3  # a pair naming an absent method is left out
    ab = table.loc[("a", "b")]
    half = T2 * 1.0 / math.sqrt(3)  # differences 10, 12, 11 points
    assert ab["seeds"] == 3 and ab["mean difference (points)"] == pytest.approx(11.0)
    assert (ab["t low (points)"], ab["t high (points)"]) == pytest.approx((11.0 - half, 11.0 + half))
    assert [ab[f"seed {s} (points)"] for s in range(3)] == pytest.approx([10.0, 12.0, 11.0])
    assert ab["verdict (a > b)"] == "reproduces"
    assert table.loc[("b", "a"), "verdict (a > b)"] == "contradicted"
    assert table.loc[("b", "a"), "seeds a < b (images)"] == 3 and ab["seeds a > b (images)"] == 3
    # the image half-width is the mean over seeds of each seed's paired-bootstrap half-width
    rows = hand_records.set_index(["method", "seed"])["record"]
    from soupkit.experiments.run import read_correct

    expected = np.mean([paired_difference(read_correct(rows["a", s]), read_correct(rows["b", s])).half_width
                        for s in range(3)]) * 100
    assert ab["image half-width (points)"] == pytest.approx(expected) and 0 < expected < 10
    same = table.loc[("b", "c")]  # identical predictions: no difference, over images or seeds
    assert (same["mean difference (points)"], same["image half-width (points)"]) == (0.0, 0.0)
    assert same["verdict (a > b)"] == "cannot tell at this scale"


def test_one_seed_gives_no_interval(hand_records):
    one = hand_records[hand_records.seed == 0]
    assert np.isnan(seed_summary(one).set_index("method").loc["a", "t low (%)"])
    row = seed_comparisons(one, [("a", "b")]).iloc[0]
    assert np.isnan(row["t low (points)"]) and row["verdict (a > b)"] == "cannot tell at this scale"


# ---- the seeded split and the zoo recipe of a seed ----------------------------------------------------------
SMALL = dict(model={"width": 16, "layers": 1, "heads": 2, "output_dim": 8}, batch_size=64, pretrain_epochs=1,
             lp_steps=5, epoch_choices=[1], max_pretrain=64, max_finetune=64, max_eval=50)


def test_seed_zoo_config():
    config = seed_zoo_config(3, 4, SMALL)
    assert (config.k, config.search_seed, config.pretrain_seed, config.split_seed) == (4, 3, 3, 3)
    assert config.model == ViTConfig(width=16, layers=1, heads=2, output_dim=8) and config.epoch_choices == (1,)
    assert seed_zoo_config(0) == ZooConfig(split_seed=0)  # seed 0: the default recipe, split seed 0
    with pytest.raises(ValueError, match="set by the seed study"):
        seed_zoo_config(1, 4, {"search_seed": 2})


def test_split_seed_zero_is_the_committed_file_and_others_differ(tmp_path):
    committed = read_split_file()
    config = ZooConfig(split_seed=0)
    assert zoo_mod.zoo_splits(tmp_path, config, create=True).fingerprint == committed.fingerprint
    assert (tmp_path / "animal_mnist_v3_seed0.json").is_file()
    other = zoo_mod.zoo_splits(tmp_path, ZooConfig(split_seed=1), create=True)
    assert other.fingerprint != committed.fingerprint
    assert {k: len(getattr(other, k)) for k in ("pretrain", "finetune", "heldout", "test")} == \
        {k: len(getattr(committed, k)) for k in ("pretrain", "finetune", "heldout", "test")}
    assert zoo_mod.zoo_splits(tmp_path, ZooConfig()).fingerprint == committed.fingerprint  # None: committed file


# ---- a tiny study end to end ------------------------------------------------------------------------------
FAST = {"mehl+": {"epochs": 0.5, "model_batch_size": 1}, "greedy": {}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    records = seed_study(out, [0, 5], ["greedy", "mehl+"], FAST, num_models=2, heldout_size=50,
                         zoo_overrides=SMALL, progress=False)
    return out, records


def test_seed_study_writes_records_for_every_seed_and_method(study):
    out, records = study
    assert list(zip(records.seed, records.method)) == [(0, "greedy"), (0, "mehl+"), (5, "greedy"), (5, "mehl+")]
    assert records.status.eq("ok").all() and records.test_accuracy.between(0, 1).all()
    on_disk = read_seed_records(out)
    pd.testing.assert_frame_equal(on_disk, records, check_dtype=False)
    assert not pd.read_csv(out / "records.csv").record.str.startswith("/").any()  # relative to out_dir
    for path in records.record:
        rec = json.loads(open(path).read())
        assert rec["heldout_size"] == 50 and rec["num_models"] == 2
    assert [json.loads(open(p).read())["seed"] for p in records.record] == [0, 0, 5, 5]  # RunSpec.seed = seed
    summary = seed_summary(records)
    assert list(summary.method) == ["greedy", "mehl+"] and summary.seeds.eq(2).all()
    row = seed_comparisons(records, [("mehl+", "greedy")]).iloc[0]
    assert row["seeds"] == 2 and {"seed 0 (points)", "seed 5 (points)"} <= set(row.index)


def test_different_seeds_give_different_zoos_and_splits(study):
    out, _ = study
    zoos = {s: load_zoo(out / f"seed_{s}" / "zoo") for s in (0, 5)}
    assert zoos[0].config.search_seed == 0 and zoos[5].config.pretrain_seed == 5 and zoos[5].config.split_seed == 5
    assert zoos[0].info["splits_fingerprint"] == read_split_file().fingerprint
    assert zoos[5].info["splits_fingerprint"] != zoos[0].info["splits_fingerprint"]
    assert zoos[0].info["backbone"]["sha256"] != zoos[5].info["backbone"]["sha256"]
    assert {r["sha256"] for r in zoos[0].records}.isdisjoint(r["sha256"] for r in zoos[5].records)
    assert zoos[0].records[0]["hparams"] != zoos[5].records[0]["hparams"]
    x0, _ = zoos[0].tensors("test", 20)  # each zoo reads its own split file
    x5, _ = zoos[5].tensors("test", 20)
    assert not np.array_equal(x0.numpy(), x5.numpy())
    table = seed_zoo_table(out, [0, 5])
    assert list(table.seed) == [0, 5] and table.split.nunique() == 2 and table.K.eq(2).all()


def test_seed_study_resumes_without_running_anything(study, monkeypatch):
    out, records = study
    import soupkit.experiments.seeds as seeds_mod

    def boom(*a, **k):
        raise AssertionError("nothing should run again")

    monkeypatch.setattr(seeds_mod, "run_methods", boom)
    monkeypatch.setattr(seeds_mod, "build_zoo", boom)
    again = seed_study(out, [0, 5], ["greedy", "mehl+"], FAST, num_models=2, heldout_size=50,
                       zoo_overrides=SMALL, progress=False)
    pd.testing.assert_frame_equal(again, records)


def test_seed_study_reruns_only_stale_records(study, monkeypatch, tmp_path):
    out, _ = study
    import soupkit.experiments.seeds as seeds_mod

    calls = []
    monkeypatch.setattr(seeds_mod, "build_zoo", lambda *a, **k: calls.append(("zoo", a[0].parent.name)))
    monkeypatch.setattr(seeds_mod, "run_methods",
                        lambda zoo_dir, folder, todo, **k: calls.append(("run", folder.name, tuple(todo))))
    # other options for mehl+ only: its two records are stale, greedy's are not
    seed_study(out, [0, 5], ["greedy", "mehl+"], {**FAST, "mehl+": {"epochs": 0.25, "model_batch_size": 1}},
               num_models=2, heldout_size=50, zoo_overrides=SMALL, progress=False)
    assert calls == [("zoo", "seed_0"), ("run", "seed_0", ("mehl+",)), ("zoo", "seed_5"), ("run", "seed_5", ("mehl+",))]
    with pytest.raises(ValueError, match="unknown method"):
        seed_study(tmp_path, [0], ["nope"], {}, progress=False)


def test_a_zoo_of_another_recipe_is_refused(study):
    out, _ = study
    with pytest.raises(ZooMismatchError):  # same folder, other recipe: never mixed silently
        build_zoo(out / "seed_5" / "zoo", seed_zoo_config(5, 2, {**SMALL, "lp_steps": 6}), progress=False,
                  num_threads=1)


# ---- the runner: notebook 10 only when named ---------------------------------------------------------------
def test_seeds_notebook_runs_only_when_named(tmp_path, monkeypatch, capsys):
    import nbformat

    assert "10_seeds" in runner.NOTEBOOKS and "10_seeds" in runner.EXTRA and runner.DEPENDS["10_seeds"] == ()
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for name in ("01_zoo", "10_seeds"):
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        params = nbformat.v4.new_code_cell("out_dir = 'x'")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell("print('ran')")]
        nbformat.write(nb, nbs / f"{name}.ipynb")
    monkeypatch.chdir(nbs)
    (tmp_path / "default.yaml").write_text("common: {}\n")
    assert [n for n, _ in runner.run_notebooks(str(tmp_path / "default.yaml"), tmp_path / "a")] == ["01_zoo"]
    (tmp_path / "named.yaml").write_text("only: [10_seeds]\ncommon: {}\n")
    assert [n for n, _ in runner.run_notebooks(str(tmp_path / "named.yaml"), tmp_path / "b")] == ["10_seeds"]
    assert [n for n, _ in runner.run_notebooks(str(tmp_path / "default.yaml"), tmp_path / "c",
                                               only=["10_seeds"])] == ["10_seeds"]
    capsys.readouterr()
    runner.main(["--stages"])  # make test's nbval groups: without the seed study
    assert "10_seeds" not in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("only: [10_nope]\n")
    with pytest.raises(ValueError, match="unknown notebook"):
        runner.run_notebooks(str(tmp_path / "bad.yaml"), tmp_path / "d")


def test_seeds_preset_parameters_are_declared():
    import papermill

    preset = runner.load_preset("seeds")
    assert preset["only"] == ["10_seeds"] and "seeds" in runner.COMMITTED_FIGURES
    declared = set(papermill.inspect_notebook(str(runner.find_notebooks(Path(__file__).parent) / "10_seeds.ipynb")))
    assert set(preset["notebooks"]["10_seeds"]) <= declared and set(preset["common"]) <= declared
    assert len(preset["notebooks"]["10_seeds"]["seeds"].split(",")) >= 3  # an interval over seeds needs S >= 3
    from soupkit import METHODS

    names = preset["notebooks"]["10_seeds"]["methods"].split(",")
    assert set(names) <= set(METHODS)
    nb_default = papermill.inspect_notebook(str(runner.find_notebooks(Path(__file__).parent) / "10_seeds.ipynb"))["methods"]["default"]
    assert set(nb_default.strip('"').split(",")) <= set(METHODS)


def test_a_backbone_is_not_shared_across_split_seeds(study, tmp_path):
    import dataclasses

    out, _ = study
    other = dataclasses.replace(load_zoo(out / "seed_0" / "zoo").config, split_seed=5)  # same pre-training seed
    with pytest.raises(ZooMismatchError, match="split_seed"):
        build_zoo(tmp_path / "zoo", other, progress=False, num_threads=1, pretrained_from=out / "seed_0" / "zoo")


def test_seeds_in_worker_processes_give_the_same_zoos_and_records(study, tmp_path):
    out, records = study
    parallel = seed_study(tmp_path, [0, 5], ["greedy"], FAST, num_models=2, heldout_size=50,
                          zoo_overrides=SMALL, jobs=2, progress=False)
    assert list(parallel.test_accuracy) == list(records[records.method == "greedy"].test_accuracy)
    for seed in (0, 5):
        serial_zoo, worker_zoo = (load_zoo(d / f"seed_{seed}" / "zoo") for d in (out, tmp_path))
        assert [r["sha256"] for r in worker_zoo.records] == [r["sha256"] for r in serial_zoo.records]
    with pytest.raises(ValueError, match="jobs"):
        seed_study(tmp_path, [0], ["greedy"], {}, jobs=0, progress=False)
