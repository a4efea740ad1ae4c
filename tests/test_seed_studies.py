"""The paper's other studies over seeds (soupkit.experiments.seed_studies) and their claims with intervals over
seeds (claims.study_differences): hand-made folders with known differences, a tiny run end to end, and the
settings against notebooks 04, 06, 07 and 09."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t

import soupkit
from soupkit.config import HYPERPLANE_DEFAULTS, LEARNED_DEFAULTS
from soupkit.experiments import runner
from soupkit.experiments import seed_studies
from soupkit.experiments.claims import claims_table, study_differences
from soupkit.experiments.seed_studies import SideStudySettings, run_side_studies, side_study_file
from soupkit.experiments.seeds import seed_study

T2 = t.ppf(0.975, 2)  # 3 seeds


def _run(folder: Path, name: str, correct: np.ndarray) -> Path:
    """``<folder>/<name>.json`` and its predictions (labels 0, prediction 0 where ``correct``)."""
    folder.mkdir(parents=True, exist_ok=True)
    predicted = np.where(correct, 0, 1)
    (folder / f"{name}.predictions.csv").write_text(
        "label,prediction\n" + "".join(f"0,{p}\n" for p in predicted))
    (folder / f"{name}.json").write_text(json.dumps({"method": name, "status": "ok",
                                                     "test_accuracy": float(correct.mean())}))
    return folder / f"{name}.json"


def _first(n_right: int, n: int = 200) -> np.ndarray:
    return np.arange(n) < n_right


def _hand_seed(root: Path, gap: int, written_from: str = "elsewhere") -> None:
    """One seed's three studies on 200 test images, ``gap`` images apart where a claim compares two runs.

    Table 3: greedy 180 -> 170 right (drop 10), MEHL+ 180 -> 170 + gap (drop 10 - gap): greedy loses ``gap``
    images more (gap / 2 points). Figure 2: MEHL+ on the first 2 models right on 170 + gap, greedy on all 4 on
    170. Ablations: b = 4 minus b = 2 and passes 2 minus 1 are ``gap`` images, epochs 2 minus 1 is 0, and θ_i − θ̄
    minus θ_i is ``gap``. Record paths are written as if the study had run from another folder."""
    top = root / "top_models"
    rows = []
    for method, right in (("greedy", (180, 170)), ("mehl+", (180, 170 + gap))):
        for e, r in zip((0, 2), right):
            _run(top / f"top{e}", method, _first(r))
            rows.append({"eliminated": e, "paper_eliminated": {0: 0, 2: 22}[e], "method": method,
                         "record_path": f"{written_from}/top_models/top{e}/{method}.json"})
    pd.DataFrame(rows).to_csv(top / "records.csv", index=False)
    cost = root / "finetuning_cost"
    rows = []
    for size in (2, 4):
        for method in ("greedy", "mehl+"):
            right = 170 + gap if (method, size) == ("mehl+", 2) else 170
            _run(cost / f"first{size}", method, _first(right))
            rows.append({"num_finetuned": size, "method": method,
                         "record_path": f"{written_from}/finetuning_cost/first{size}/{method}.json"})
    pd.DataFrame(rows).to_csv(cost / "records.csv", index=False)
    abl = root / "ablations"
    settings = {"base": 170, "b4": 170 + gap, "passes2": 170 + gap, "epochs2": 170, "raw": 170 - gap}
    for name, right in settings.items():
        _run(abl, name, _first(right))
    table = [("model_batch_size", 2, "base"), ("model_batch_size", 4, "b4"), ("outer_passes", 1, "base"),
             ("outer_passes", 2, "passes2"), ("epochs", 1, "epochs2"), ("epochs", 2, "base"),
             ("decentralize", True, "base"), ("decentralize", False, "raw")]
    pd.DataFrame(table, columns=["study", "value", "setting"]).to_csv(abl / "ablations.csv", index=False)
    # Appendix C: MEHL+ right on 170 + gap, greedy on 170, Learned+ on 170 + 2 gap
    for method, right in (("greedy", 170), ("learned+", 170 + 2 * gap), ("mehl+", 170 + gap)):
        _run(root / "resnet", method, _first(right))


def test_study_differences_over_seeds_hand_case(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    for seed, gap in ((0, 2), (1, 4), (2, 6)):
        _hand_seed(seeds / f"seed_{seed}", gap)
    (seeds / "seed_x").mkdir()  # not a seed folder: ignored
    diffs = study_differences(seeds).set_index("claim")
    # per seed gap / 2 points: 1, 2, 3 -> mean 2, sd 1, t interval 2 +- T2 / sqrt(3)
    half = T2 / np.sqrt(3)
    table3 = diffs.loc["Table 3: greedy loses more than MEHL-Soup+ when the top 2 models are removed (points)"]
    assert table3["seeds"] == 3 and table3["mean difference (points)"] == pytest.approx(2.0)
    assert (table3["t low (points)"], table3["t high (points)"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert [table3[f"seed {s} (points)"] for s in range(3)] == pytest.approx([1.0, 2.0, 3.0])
    assert table3["verdict"] == "cannot tell at this scale" and table3["expected"] == 1  # 2 - 2.48 < 0
    fig2 = diffs.loc["Figure 2: MEHL-Soup+ with the first 2 fine-tunes at least as accurate as greedy with all 4 (points)"]
    assert fig2["mean difference (points)"] == pytest.approx(2.0)
    b = diffs.loc["Fig. 2(a): model mini-batch size b does not change accuracy: b = 4 minus b = 2 (points)"]
    assert b["mean difference (points)"] == pytest.approx(2.0) and b["expected"] == "equal"
    assert b["verdict"] == "cannot tell at this scale"   # [-0.48, 4.48] is not within +-0.5
    epochs = diffs.loc["Fig. 2(c): more inner iterations bring no significant gain: epochs = 2 minus epochs = 1 (points)"]
    assert epochs["mean difference (points)"] == 0.0 and epochs["t half-width (points)"] == 0.0
    assert epochs["verdict"] == "reproduces"   # exactly 0 on every seed: within +-0.5
    app_d = diffs.loc["Appendix D: directions θ_i − θ̄ more accurate than θ_i (points)"]
    assert app_d["mean difference (points)"] == pytest.approx(2.0)
    assert app_d["image half-width (points)"] > 0
    greedy = diffs.loc["Appendix C (ResNet, BatchNorm): MEHL-Soup+ more accurate than Greedy-Soup (points)"]
    learned = diffs.loc["Appendix C (ResNet, BatchNorm): MEHL-Soup+ more accurate than Learned-Soup+ (points)"]
    assert [greedy[f"seed {s} (points)"] for s in range(3)] == pytest.approx([1.0, 2.0, 3.0])
    assert [learned[f"seed {s} (points)"] for s in range(3)] == pytest.approx([-1.0, -2.0, -3.0])
    assert learned["verdict"] == "cannot tell at this scale" and learned["t high (points)"] == pytest.approx(-2 + half)


def test_claims_table_takes_the_seed_interval_for_the_studies(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    _hand_seed(out, 2, written_from="../outputs")          # the main run: one zoo
    for seed, gap in ((0, 4), (1, 4), (2, 4)):             # three seeds agreeing on 2 points exactly
        _hand_seed(out / "seeds" / f"seed_{seed}", gap)
    (out / "figures").mkdir()
    table = claims_table(out, out / "figures", out / "seeds").set_index("claim")
    table3 = table.loc["Table 3: greedy loses more than MEHL-Soup+ when the top 2 models are removed (points)"]
    assert table3["ours, one run (95 % CI over test images)"].startswith("+1.00 [")
    assert table3["ours, over seeds (95 % CI)"] == "+2.00 [+2.00, +2.00]"
    assert table3["decided by"] == "seeds" and table3["verdict"] == "reproduces"
    assert table3["basis"] == "top models (04) and 3 seeds (10)"
    assert table3["paper"].endswith("(top 22 of 72)")
    without = claims_table(out, out / "figures", None).set_index("claim")
    assert without.loc[table3.name, "decided by"] == "test images"
    assert without.loc[table3.name, "basis"] == "top models (04), one zoo"
    order = list(table.index)
    assert order.index(table3.name) < order.index(
        "Fig. 2(a): model mini-batch size b does not change accuracy: b = 4 minus b = 2 (points)")
    resnet = table.loc["Appendix C (ResNet, BatchNorm): MEHL-Soup+ more accurate than Greedy-Soup (points)"]
    assert (resnet["ours, over seeds (95 % CI)"], resnet["verdict"]) == ("+2.00 [+2.00, +2.00]", "reproduces")
    assert resnet["basis"] == "ResNet zoo (09) and 3 seeds (10)" and order[-1].startswith("Appendix C")
    assert without.loc[resnet.name, "basis"] == "ResNet zoo (09), one zoo"


def test_memory_ratio_reads_the_seed_run_not_a_side_study(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    for seed in (0, 1):
        folder = seeds / f"seed_{seed}"
        for method, peak in (("learned+", 400.0), ("mehl+", 100.0)):
            _run(folder, method, _first(150))
            rec = json.loads((folder / f"{method}.json").read_text())
            (folder / f"{method}.json").write_text(json.dumps({**rec, "peak_memory_bytes": peak,
                                                               "seconds_total": 1.0, "isolated": True}))
        side = folder / "ablations" / "a"           # sorts before the seed's own file under rglob
        _run(side, "mehl+", _first(150))
        rec = json.loads((side / "mehl+.json").read_text())
        (side / "mehl+.json").write_text(json.dumps({**rec, "peak_memory_bytes": 1.0, "seconds_total": 1.0}))
    pd.DataFrame({"seed": [0, 0, 1, 1], "method": ["learned+", "mehl+"] * 2,
                  "test_accuracy": [0.75] * 4}).to_csv(seeds / "records.csv", index=False)
    table = claims_table(tmp_path, tmp_path / "figures", seeds, pairs=[])
    memory = table[table["claim"].str.startswith("Learned-Soup+ / MEHL-Soup+ peak memory (ratio")].iloc[0]
    assert memory["ours, over seeds (95 % CI)"] == "4.00x [4.00, 4.00]"
    assert memory["verdict"] == "reproduces" and memory["decided by"] == "seeds"  # over seeds: a real verdict


def test_settings_are_the_notebooks_defaults() -> None:
    import papermill

    folder = runner.find_notebooks(Path(__file__).parent)

    def defaults(name: str) -> dict:
        found = papermill.inspect_notebook(str(folder / f"{name}.ipynb"))
        return {k: eval(v["default"]) for k, v in found.items()}  # literals of a parameters cell

    s = SideStudySettings()
    nb04, nb06, nb07 = defaults("04_top_models"), defaults("06_finetuning_cost"), defaults("07_ablations")
    for nb in (nb04, nb06):
        assert tuple(nb["methods"].split(",")) == s.methods and nb["heldout_size"] == s.heldout_size
        for key in ("batch_size", "model_batch_size", "seed"):
            assert nb[key] == (getattr(s, key) if key != "seed" else 0), key
        for key in ("learned_lr", "hyperplane_lr", "weight_decay", "epochs"):
            assert nb[key] is None and getattr(s, key) is None, key  # overrides only: the methods' defaults
    assert tuple(int(c) for c in nb04["eliminate"].split(",")) == s.eliminate
    assert nb04["paper_models"] == s.paper_models
    assert tuple(int(c) for c in nb06["num_finetuned"].split(",")) == s.num_finetuned
    assert nb07["heldout_size"] == s.ablation_heldout_size and nb07["batch_size"] == s.batch_size
    assert (nb07["hyperplane_lr"], nb07["weight_decay"], nb07["epochs"]) == (None, None, None)
    assert (nb07["model_batch_size"], nb07["outer_passes"]) == (s.model_batch_size, s.outer_passes)
    assert tuple(int(c) for c in nb07["batch_sizes"].split(",")) == s.batch_sizes
    assert tuple(int(c) for c in nb07["pass_values"].split(",")) == s.pass_values
    assert tuple(float(c) for c in nb07["epoch_values"].split(",")) == s.epoch_values
    assert nb07["decentralize_ablation"] == s.decentralize_ablation
    nb09 = defaults("09_resnet")
    assert (nb09["k"], nb09["width"], nb09["pretrain_epochs"], nb09["max_eval"]) == (
        s.resnet_k, s.resnet_width, s.resnet_pretrain_epochs, s.resnet_max_eval)
    assert tuple(int(c) for c in nb09["finetune_epochs"].split(",")) == s.resnet_epoch_choices
    assert (nb09["heldout_size"], nb09["model_batch_size"]) == (s.resnet_heldout_size, s.resnet_model_batch_size)
    for key in ("learned_lr", "hyperplane_lr", "weight_decay", "epochs"):
        assert nb09[key] is None, key
    # None in the settings is each method's default, written out in the options the studies run with
    options = s.options()
    hyperplane, learned = HYPERPLANE_DEFAULTS.algorithm, LEARNED_DEFAULTS.algorithm
    assert options["mehl+"] == {"lr": hyperplane.lr, "weight_decay": hyperplane.weight_decay,
                                "epochs": hyperplane.epochs, "model_batch_size": s.model_batch_size}
    assert s.options(["learned+"])["learned+"] == {"lr": learned.lr, "epochs": learned.epochs}
    assert nb09["seed"] == 0 and nb09["threads"] == 1 and nb09["methods"] == "all"
    assert set(s.resnet_methods) <= set(soupkit.METHODS)


# ---- a tiny run end to end --------------------------------------------------------------------------------
SMALL = dict(model={"width": 16, "layers": 1, "heads": 2, "output_dim": 8}, batch_size=64, pretrain_epochs=1,
             lp_steps=5, epoch_choices=[1], max_pretrain=64, max_finetune=64, max_eval=50)
TINY = SideStudySettings(eliminate=(0, 36), num_finetuned=(1, 2), heldout_size=50, ablation_heldout_size=50,
                         model_batch_size=1, epochs=0.5, batch_sizes=(1, 2), pass_values=(1,), epoch_values=(0.5,),
                         resnet_k=2, resnet_pretrain_epochs=1, resnet_epoch_choices=(1,), resnet_max_eval=50,
                         resnet_heldout_size=50, resnet_model_batch_size=1, resnet_max_train=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("seed_studies")
    seed_study(out, [0, 3], ["greedy"], {}, num_models=2, heldout_size=50, zoo_overrides=SMALL, progress=False)
    files = run_side_studies(out, [0, 3], settings=TINY, progress=False)
    return out, files


def test_side_studies_write_every_study_of_every_seed(tiny) -> None:
    out, files = tiny
    assert files == [side_study_file(out, s, st) for s in (0, 3) for st in ("top_models", "finetuning_cost",
                                                                             "ablations", "resnet")]
    assert all(f.is_file() for f in files)
    top = pd.read_csv(side_study_file(out, 3, "top_models"))
    assert sorted(top["eliminated"].unique()) == [0, 1] and set(top["method"]) == {"greedy", "mehl+"}
    assert all(json.loads(Path(p).read_text())["seed"] == 3 for p in top["record_path"])  # RunSpec.seed = seed
    diffs = study_differences(out)
    # one value of passes and of epochs in TINY: those two studies have nothing to compare
    assert diffs["seeds"].eq(2).all() and len(diffs) == 6
    assert list(diffs["claim"].str.split(":").str[0]) == ["Table 3", "Figure 2", "Fig. 2(a)", "Appendix D"] + [
        "Appendix C (ResNet, BatchNorm)"] * 2
    resnet = pd.read_csv(side_study_file(out, 3, "resnet"))
    assert list(resnet["method"]) == list(TINY.resnet_methods) and resnet["seed"].eq(3).all()
    zoo = json.loads((out / "seed_3" / "zoo_resnet" / "zoo.json").read_text())
    assert zoo["config"]["search_seed"] == 3 and zoo["config"]["model"]["arch"] == "resnet"


def test_side_studies_resume_without_running_anything(tiny, monkeypatch) -> None:
    out, files = tiny

    def boom(*args, **kwargs):
        raise AssertionError("a finished study ran again")

    monkeypatch.setattr(seed_studies, "run_side_study", boom)
    assert run_side_studies(out, [0, 3], settings=TINY, progress=False) == files


def test_side_studies_in_workers_give_the_same_records(tiny, tmp_path) -> None:
    out, _ = tiny
    import shutil

    shutil.copytree(out / "seed_0" / "zoo", tmp_path / "seed_0" / "zoo")
    shutil.copytree(out / "seed_3" / "zoo", tmp_path / "seed_3" / "zoo")
    run_side_studies(tmp_path, [0, 3], ["top_models"], TINY, jobs=2, progress=False)
    for seed in (0, 3):
        serial = pd.read_csv(side_study_file(out, seed, "top_models"))
        worker = pd.read_csv(side_study_file(tmp_path, seed, "top_models"))
        assert list(worker["test_accuracy"]) == list(serial["test_accuracy"])


def test_bad_input_is_refused(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="notebook 10"):
        run_side_studies(tmp_path, [0], progress=False)
    with pytest.raises(ValueError, match="unknown studies"):
        run_side_studies(tmp_path, [0], ["nosuch"], progress=False)
    with pytest.raises(ValueError, match="jobs"):
        run_side_studies(tmp_path, [0], jobs=0, progress=False)


def test_a_study_with_a_missing_run_says_not_run(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    _hand_seed(out, 2)
    (out / "ablations" / "raw.predictions.csv").unlink()   # Appendix D's θ_i run lost its predictions
    for seed in (0, 1):
        _hand_seed(out / "seeds" / f"seed_{seed}", 2)
        (out / "seeds" / f"seed_{seed}" / "ablations" / "raw.predictions.csv").unlink()
    table = claims_table(out, out / "figures", out / "seeds").set_index("claim")
    row = table.loc["Appendix D: directions θ_i − θ̄ more accurate than θ_i (points)"]
    assert (row["verdict"], row["ours, over seeds (95 % CI)"]) == ("not run", "-")
    assert "Appendix D" not in " ".join(study_differences(out / "seeds")["claim"])
