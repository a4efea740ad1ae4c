"""Pool diagnostics (``soupkit.pool.diagnostics``): duplicates, near-duplicates and models outside the shared basin
are named by file; a clean pool of fine-tunes flags nothing; the streamed Gram matrix is the explicit one."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from soupkit import CheckpointPool
from soupkit.cli import main
from soupkit.errors import DuplicateCheckpointWarning, SharedBasinWarning
from soupkit.experiments.run import zoo_table
from soupkit.pool.diagnostics import centred_gram, diagnose, duplicate_records
from conftest import BNNet, save_files


def _noisy(state: dict, scale: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def _clean(pool_states) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of any kind
        report = diagnose(CheckpointPool(pool_states))
    assert not report.flagged and not report.exact_duplicates and not report.near_duplicates
    assert not report.outside_basin and not report.far_from_centre
    assert report.summary().startswith(f"{len(pool_states)} models: nothing flagged (closest pair ")


def test_a_clean_pool_of_finetunes_flags_nothing(bn_setup, tied_setup, tmp_path):
    _, states, _ = bn_setup
    _clean(save_files(states, tmp_path))
    _clean(tied_setup[1])  # in memory, tied weights


def test_an_exact_duplicate_is_named(bn_setup, tmp_path):
    _, states, _ = bn_setup
    paths = save_files([*states, states[1]], tmp_path)  # m5 is m1
    with pytest.warns(DuplicateCheckpointWarning, match=r"identical: m1\.safetensors, m5\.safetensors"):
        report = diagnose(CheckpointPool(paths))
    assert report.exact_duplicates == (("m1.safetensors", "m5.safetensors"),)
    assert report.flags[1] == ("identical to m5.safetensors",) and report.flags[5] == ("identical to m1.safetensors",)
    assert not report.near_duplicates and report.nearest[1] == 5 and report.nearest_ratio[1] == 0.0
    assert not any(report.flags[i] for i in (0, 2, 3, 4))
    assert "m1.safetensors" in report.format() and "identical" in report.summary()


def test_a_near_duplicate_is_named(bn_setup, tmp_path):
    base, states, _ = bn_setup
    step = torch.cat([(states[2][k] - v).reshape(-1) for k, v in base.state_dict().items() if v.is_floating_point()])
    scale = 1e-3 * float(step.norm()) / step.numel() ** 0.5  # noise of 1e-3 of the fine-tune's displacement
    paths = save_files([*states, _noisy(states[2], scale)], tmp_path)
    with pytest.warns(DuplicateCheckpointWarning, match=r"near-duplicates: m2\.safetensors and m5\.safetensors"):
        report = diagnose(CheckpointPool(paths))
    assert not report.exact_duplicates
    assert [(a, b) for a, b, _ in report.near_duplicates] == [("m2.safetensors", "m5.safetensors")]
    assert report.near_duplicates[0][2] < 0.01
    assert report.flags[5][0].startswith("near-duplicate of m2.safetensors")
    row = report.table()[5]
    assert row["file"] == "m5.safetensors" and row["nearest"] == "m2.safetensors" and row["nearest_ratio"] < 0.01
    assert not any(report.flags[i] for i in (0, 1, 3, 4))


def test_an_independent_initialisation_is_outside_the_basin(bn_setup, tmp_path):
    _, states, _ = bn_setup
    torch.manual_seed(123)
    stranger = {k: v.detach().clone() for k, v in BNNet().state_dict().items()}
    paths = save_files([*states, stranger], tmp_path)
    with pytest.warns(SharedBasinWarning, match=r"m5\.safetensors \(cosine"):
        report = diagnose(CheckpointPool(paths))
    assert report.outside_basin == ("m5.safetensors",) and report.basin_cosine[5] < 0.5
    assert min(report.basin_cosine[:5]) > 0.9
    assert report.basin.shared  # the pool's mean cosine alone would not have named it
    assert report.flags[5][0].startswith("outside the shared basin") and not any(report.flags[:5])


def test_a_model_far_from_the_centre_is_named(bn_setup):
    base, states, _ = bn_setup
    start = base.state_dict()
    far = {k: start[k] + 3 * (v - start[k]) if v.is_floating_point() else v for k, v in states[0].items()}
    with pytest.warns(SharedBasinWarning, match=r"<state dict 5> \(\d+\.\d+ x the others' median"):
        report = diagnose(CheckpointPool([*states, far]))
    assert report.far_from_centre == ("<state dict 5>",) and report.centre_ratio[5] > 10  # ~21
    assert report.basin_cosine[5] > 0.5  # in the basin by its direction, far by its length


def test_the_streamed_gram_is_the_explicit_one(bn_setup, tmp_path):
    _, states, _ = bn_setup
    paths = save_files(states, tmp_path)
    x = torch.stack([torch.cat([v.double().reshape(-1) for v in s.values() if v.is_floating_point()]) for s in states])
    x = x - x.mean(0)
    explicit = x @ x.T
    for block_bytes in (1, 1 << 30):  # one key a block, and all keys in one block
        streamed = centred_gram(CheckpointPool(paths), block_bytes=block_bytes)
        assert streamed.shape == (5, 5) and streamed.dtype == torch.float64
        torch.testing.assert_close(streamed, explicit, rtol=1e-12, atol=1e-12)
    report = diagnose(CheckpointPool(paths), block_bytes=1)
    assert report.stats["blocks"] == len([k for k, v in states[0].items() if v.is_floating_point()])
    dist = (explicit.diagonal()[:, None] + explicit.diagonal()[None, :] - 2 * explicit).clamp_min(0).sqrt()
    assert report.centre_distance == pytest.approx(explicit.diagonal().sqrt().tolist())
    assert report.nearest_ratio[0] == pytest.approx(float(dist[0, 1:].min() / report.median_distance))


def test_small_pools(bn_setup):
    _, states, _ = bn_setup
    one = diagnose(CheckpointPool(states[:1]))
    assert not one.flagged and one.nearest == (None,) and one.median_distance is None
    two = diagnose(CheckpointPool(states[:2]))
    assert not two.flagged and two.nearest == (1, 0) and two.nearest_ratio == (1.0, 1.0)


def test_records_with_identical_hparams_and_accuracies():
    hp = {"lr": 3e-5, "wd": 0.1}
    records = [{"index": 0, "file": "model_0.pt", "hparams": hp, "ImageNet": 0.79, "heldout_acc": 0.8},
               {"index": 1, "file": "model_4.pt", "hparams": dict(hp), "ImageNet": 0.81, "heldout_acc": 0.8},
               {"index": 2, "path": "/ckpt/model_5.pt", "hparams": dict(hp), "ImageNet": 0.81, "heldout_acc": 0.8},
               {"index": 3, "hparams": {}, "ImageNet": 0.81, "heldout_acc": 0.8},  # no hparams: never grouped
               {"index": 4, "hparams": {}, "ImageNet": 0.81, "heldout_acc": 0.8}]
    # the default compares the keys named "...acc...": not ImageNet, on which model_0 differs
    assert duplicate_records(records) == (("model_0.pt", "model_4.pt", "model_5.pt"),)
    assert duplicate_records(records, accuracy_keys=["ImageNet", "heldout_acc"]) == (("model_4.pt", "model_5.pt"),)


def test_the_zoo_table_has_a_diagnostics_column(bn_setup, tmp_path):
    _, states, _ = bn_setup
    paths = save_files([*states, states[3]], tmp_path)
    records = tuple({"index": i, "file": p.name, "hparams": {"lr": 0.1 * (i % 5)}, "heldout_acc": 0.5 + 0.01 * (i % 5),
                     "test_acc": 0.5} for i, p in enumerate(paths))  # m5 repeats m0's records, m3's weights
    zoo = SimpleNamespace(records=records, paths=paths)
    assert "diagnostics" not in zoo_table(zoo).columns
    with pytest.warns(DuplicateCheckpointWarning):
        table = zoo_table(zoo, diagnostics=True)
    assert table.diagnostics.tolist() == [
        "same hyper-parameters and accuracies as m5.safetensors", "", "", "identical to m5.safetensors", "",
        "identical to m3.safetensors; same hyper-parameters and accuracies as m0.safetensors"]


def test_the_cli_diagnoses_a_folder(bn_setup, tmp_path, capsys):
    _, states, _ = bn_setup
    save_files([*states, states[0]], tmp_path)
    with pytest.warns(DuplicateCheckpointWarning):
        assert main(["diagnose", "--pool", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["file", "distance_to_centre", "centre_ratio", "nearest", "nearest_ratio",
                              "basin_cosine", "flags"]
    assert [line.split()[0] for line in out[1:7]] == [f"m{i}.safetensors" for i in range(6)]
    assert out[1].endswith("identical to m5.safetensors") and out[7].startswith("6 models: 2 identical: m0.safetensors")
    (tmp_path / "m5.safetensors").unlink()  # without the copy
    assert main(["diagnose", "--pool", str(tmp_path / "m*.safetensors")]) == 0
    assert "5 models: nothing flagged" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["diagnose"], "one of the arguments --zoo --pool --pool-list is required"),
    (["diagnose", "--pool", "no/such/*.pt"], "matches no file"),
    (["diagnose", "--zoo", "no/such/zoo"], "--zoo no/such/zoo: no such folder"),
])
def test_cli_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.startswith("python -m soupkit diagnose: error: ")


def test_cli_names_a_broken_file(tmp_path, capsys):
    (tmp_path / "m0.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        main(["diagnose", "--pool", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "m0.safetensors: cannot be read" in err and "Traceback" not in err
