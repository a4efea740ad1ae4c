"""Ablation grid (Fig. 3, appendix D): the settings and options it runs, the cosine diagnostic, a tiny zoo end to end."""
from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from soupkit import CheckpointPool  # noqa: E402
from soupkit.experiments import ablations  # noqa: E402
from soupkit.experiments.params import parse_list
from soupkit.experiments.ablations import (Setting, ablation_grid, centred_gram, cosine_diagnostic, gram_matrices,
                                           plot_ablations, run_ablations)
from soupkit.experiments.run import read_correct  # noqa: E402
from soupkit.zoo.embedded_models import ViTConfig  # noqa: E402
from soupkit.experiments.stats import bootstrap_accuracy  # noqa: E402
from soupkit.zoo.config import ZooConfig
from soupkit.zoo.build import build_zoo  # noqa: E402

SWEEPS = {"model_batch_size": [2, 4], "outer_passes": [1, 2], "epochs": [1, 3], "decentralize": [True, False]}


def test_setting_options_count_blocks_per_pass():
    assert Setting(model_batch_size=3, outer_passes=2, epochs=1).options(8) == {
        "model_batch_size": 3, "outer_iterations": 6, "epochs": 1.0, "decentralize": True}
    assert Setting(model_batch_size=16).options(4)["model_batch_size"] == 4  # clamped to K: one block a pass
    assert Setting(decentralize=False).name.endswith("_raw")


def test_grid_varies_one_field_of_the_baseline():
    base = Setting(model_batch_size=2, epochs=1)
    grid = ablation_grid(base, SWEEPS)
    assert len(grid) == 8
    for study, value, setting in grid:
        assert getattr(setting, study) == value
        others = {f: getattr(setting, f) for f in ablations.STUDIES if f != study}
        assert others == {f: getattr(base, f) for f in others}
    assert len({s for _, _, s in grid}) == 5  # the baseline appears in all four studies
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_grid(base, {"lr": [1]})
    assert parse_list(" 4, 8,", int) == [4, 8] and parse_list("") == []


def test_runner_runs_each_setting_once_with_its_options(monkeypatch, tmp_path):
    specs = []

    def fake_run(spec):
        specs.append(spec)
        return {"outer_iterations": spec.options["outer_iterations"], "test_accuracy": 0.5, "heldout_accuracy": 0.6,
                "epochs": 1.0, "seconds_total": 0.1}

    monkeypatch.setattr(ablations, "run_method", fake_run)
    base = Setting(model_batch_size=2, epochs=1)
    table = run_ablations("zoo", tmp_path, ablation_grid(base, SWEEPS), lr=0.02, models=(0, 1, 2, 3, 4),
                          heldout_size=100)
    assert len(specs) == 5 and len(table) == 8
    by_name = {s.record: s for s in specs}
    raw = by_name[str(tmp_path / "b2_passes1_epochs1_raw.json")]
    assert raw.options == {"lr": 0.02, "weight_decay": 0.0, "model_batch_size": 2, "outer_iterations": 3,
                           "epochs": 1.0, "decentralize": False}
    assert raw.method == "mehl+" and raw.heldout_size == 100 and raw.models == (0, 1, 2, 3, 4)
    assert by_name[str(tmp_path / "b2_passes2_epochs1.json")].options["outer_iterations"] == 6
    assert by_name[str(tmp_path / "b4_passes1_epochs1.json")].options["outer_iterations"] == 2
    assert list(table[table.study == "outer_passes"].outer_iterations) == [3, 6]
    assert (tmp_path / "ablations.csv").is_file()
    assert table["test_low"].isna().all() and table["test_high"].isna().all()  # the fake runs kept no predictions
    assert table["record_path"].iloc[0] == str(tmp_path / f"{table['setting'].iloc[0]}.json")
    assert json.loads((tmp_path / "b2_passes1_epochs1.json").read_text())["cpu_seconds"] >= 0


def _hand_mean_cos(vectors, absolute=False):
    k = len(vectors)
    vals = [torch.nn.functional.cosine_similarity(vectors[i], vectors[j], dim=0)
            for i in range(k) for j in range(k) if i != j]
    vals = torch.stack(vals)
    return (vals.abs() if absolute else vals).mean().item()


def test_cosine_diagnostic_equals_a_hand_computation(bn_setup):
    _, states, _ = bn_setup
    pool = CheckpointPool(states)
    keys = [k for k, v in states[0].items() if v.is_floating_point()]
    flat = [torch.cat([s[k].reshape(-1).double() for k in keys]) for s in states]
    mean = sum(flat) / len(flat)
    centred = [v - mean for v in flat]
    table = cosine_diagnostic(pool).set_index(["vectors", "scope"])
    whole_raw, whole_dec = table.loc[("θ_i", "whole model")], table.loc[("θ_i − θ̄", "whole model")]
    assert whole_raw.mean_cosine == pytest.approx(_hand_mean_cos(flat), abs=1e-9)
    assert whole_dec.mean_cosine == pytest.approx(_hand_mean_cos(centred), abs=1e-9)
    assert whole_dec.mean_abs_cosine == pytest.approx(_hand_mean_cos(centred, True), abs=1e-9)
    # fc1.bias feeds BatchNorm: no gradient, it differs only by rounding (~1e-9), so it has no direction
    moved = [k for k in keys if max((s[k] - states[0][k]).norm() for s in states) > 1e-6 * states[0][k].norm()]
    assert "fc1.bias" not in moved and len(moved) == len(keys) - 1
    per_key = [_hand_mean_cos([s[k].reshape(-1).double() - sum(t[k].double() for t in states).reshape(-1) / 5
                               for s in states]) for k in moved]
    assert table.loc[("θ_i − θ̄", "per tensor")].mean_cosine == pytest.approx(sum(per_key) / len(per_key), abs=1e-9)
    assert whole_raw.mean_cosine > 0.9 and whole_dec.mean_abs_cosine < whole_raw.mean_cosine


def test_gram_in_chunks_equals_one_chunk_and_centring(bn_setup):
    _, states, _ = bn_setup
    pool = CheckpointPool(states)
    one, chunked = gram_matrices(pool), gram_matrices(pool, max_numel=20)
    assert set(one) == set(chunked) and all(torch.equal(one[k], chunked[k]) for k in one)
    x = torch.randn(4, 7, dtype=torch.float64)
    xc = x - x.mean(dim=0)
    assert torch.allclose(centred_gram(x @ x.T), xc @ xc.T, atol=1e-12)


TINY = ZooConfig(k=3, model=ViTConfig(width=32, layers=1, heads=2, output_dim=16), batch_size=64,
                 pretrain_epochs=1, lp_steps=5, epoch_choices=(1,), max_pretrain=128, max_finetune=128, max_eval=100)


def test_tiny_zoo_end_to_end(tmp_path):
    zoo = build_zoo(tmp_path / "zoo", TINY, progress=False, num_threads=1)
    base = Setting(model_batch_size=2, epochs=1)
    sweeps = {"model_batch_size": [2, 3], "decentralize": [True, False]}
    table = run_ablations(zoo.out_dir, tmp_path / "abl", ablation_grid(base, sweeps), heldout_size=60, batch_size=32)
    assert len(table) == 4 and table.setting.nunique() == 3
    record = json.loads((tmp_path / "abl" / "b2_passes1_epochs1.json").read_text())
    assert record["outer_iterations"] == math.ceil(3 / 2) and record["options"]["decentralize"] is True
    assert 0 <= record["test_accuracy"] <= 1 and record["cpu_seconds"] > 0
    expected = bootstrap_accuracy(read_correct(tmp_path / "abl" / "b2_passes1_epochs1.json"))
    row = table[table.setting == "b2_passes1_epochs1"].iloc[0]
    assert (row.test_low, row.test_high) == pytest.approx((expected.low, expected.high))
    assert (table.test_low <= table.test_accuracy).all() and (table.test_accuracy <= table.test_high).all()
    fig = plot_ablations(table, "tiny", base)
    assert len(fig.axes) == 2
    assert all(ax.containers for ax in fig.axes)  # error bars of the test accuracies in every panel
    fig.savefig(tmp_path / "ablations.png")
    plt.close(fig)
