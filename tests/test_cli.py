"""``python -m soupkit``: option parsing, pool lists, argument errors, and the ``--arch`` path end to end on a tiny
stand-in for open_clip and the datasets (the zoo path under torchrun: ``test_distributed.py``)."""
from __future__ import annotations

import argparse
import json

import pytest
from pathlib import Path
import torch

import soupkit
from soupkit.cli import expand_pool, main, parse_option
from conftest import install_tiny_arch


def test_option_values_are_typed():
    assert parse_option("model_batch_size=18") == ("model_batch_size", 18)
    assert parse_option("lr=5e-3") == ("lr", 0.005)
    assert parse_option("prefetch=True") == ("prefetch", True) and parse_option("recenter=false")[1] is False
    assert parse_option("clip_grad_norm=none") == ("clip_grad_norm", None)
    assert parse_option("layer_grouping=module") == ("layer_grouping", "module")
    assert parse_option("dtype=bfloat16") == ("dtype", torch.bfloat16)
    assert parse_option("dtype=bf16") == parse_option("dtype=BFloat16") == ("dtype", torch.bfloat16)
    assert parse_option("run_dir=runs/a=b") == ("run_dir", "runs/a=b")
    for bad in ("lr", "=3", "dtype=float17"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_option(bad)


def test_pool_from_globs_and_a_list_file(tmp_path):
    for name in ("b.pt", "a.pt", "c.safetensors"):
        (tmp_path / name).touch()
    (tmp_path / "sub").mkdir()
    listed = tmp_path / "sub" / "pool.txt"
    listed.write_text(f"# the pool\n../c.safetensors\n\n{tmp_path / 'a.pt'}  # absolute\n")
    paths = expand_pool([str(tmp_path / "*.pt")], str(listed))
    assert [p.name for p in paths] == ["a.pt", "b.pt", "c.safetensors", "a.pt"]
    assert paths[2].resolve() == (tmp_path / "c.safetensors").resolve()
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_pool([str(tmp_path / "*.bin")])


@pytest.mark.parametrize("argv, message", [
    (["mehl+", "--out", "o", "--zoo", "z", "--option", "learning_rate=1"], "learning_rate"),
    (["mehl+", "--out", "o", "--zoo", "z", "--option", "parallel=model"], "use --parallel"),
    (["mehl+", "--out", "o", "--zoo", "z", "--option", "lr=-1"], "lr > 0"),
    (["mehl+", "--out", "o", "--arch", "ViT-B-32"], "--pool"),
    (["mehl+", "--out", "o", "--arch", "ViT-B-32", "--pool", "x.pt"], "--data"),
    (["mehl+", "--out", "o"], "--zoo"),
])
def test_argument_errors_exit_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def tiny_arch(monkeypatch, tmp_path):
    """``--arch``'s builders replaced by BNNet and in-memory splits; the pool written as .pt files."""
    built: dict = {}
    return install_tiny_arch(monkeypatch, tmp_path, k=4, built=built), built


def test_arch_path_runs_a_soup_and_writes_the_result(tiny_arch):
    directory, built = tiny_arch
    out = directory / "out"
    argv = ["hl+", "--arch", "tiny-arch", "--pool", str(directory / "model_*.pt"), "--data", "cifar10",
            "--data-root", str(directory / "cifar"), "--workers", "0", "--batch-size", "20", "--no-progress",
            "--option", "inner_iterations=6", "--option", "clip_grad_norm=1", "--out", str(out)]
    assert main(argv) == 0
    assert built == {"num_classes": 10, "arch": "tiny-arch", "keep": False, "dataset": "cifar10",
                     "root": str(directory / "cifar"), "split_file": "splits/cifar10_heldout.json"}
    result = soupkit.SoupResult.load(out)
    assert result.coefficients.shape == (4, len(result.layer_names))
    assert 0.0 <= result.stats["test_accuracy"] <= 1.0 and result.stats["inner_iterations"] == 6
    assert result.stats["command"] == ["python", "-m", "soupkit", *argv]
    assert json.loads((out / "result.json").read_text())["name"] == "hl+"


def test_baselines_run_from_the_command_line_too(tiny_arch, capsys):
    directory, _ = tiny_arch
    main(["uniform", "--arch", "tiny-arch", "--pool", str(directory / "model_*.pt"), "--data", "cifar100",
          "--data-root", "x", "--workers", "0", "--no-eval", "--out", str(directory / "uniform")])
    assert "uniform: K=4, 1 rank(s)" in capsys.readouterr().out
    result = soupkit.SoupResult.load(directory / "uniform")
    assert torch.allclose(result.coefficients, torch.full((4,), 0.25)) and "test_accuracy" not in result.stats


# ---- one sentence for bad arguments; notebook 02's settings on a zoo -----------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["nosuch", "--out", "o", "--zoo", "z"], "'nosuch' is not a method; choose from best, uniform"),
    (["mehl+", "--out", "o", "--zoo", "no/such/zoo"], "--zoo no/such/zoo: no such folder; build the zoo with "
                                                     "notebooks/01_zoo.ipynb"),
    (["mehl+", "--out", "o", "--zoo", "z", "--batch-size", "many"], "argument --batch-size: invalid int value"),
])
def test_bad_arguments_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "zoo.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("python -m soupkit: error: ")
    assert not (tmp_path / "o").exists()


def test_a_folder_that_is_no_zoo_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["mehl+", "--out", str(tmp_path / "o"), "--zoo", str(tmp_path)])
    assert "not a zoo (no zoo.json or source.json in it)" in capsys.readouterr().err


def test_the_command_line_runs_notebook_02s_options():
    """Notebook 02's parameters cell and config.MAIN_TABLE_SETTINGS are the same numbers (the cell's None learning
    settings: the methods' defaults), and the CLI's options on a zoo are what notebook 02's main cell passes
    (soup_options of its parameters), method by method."""
    import ast

    import nbformat

    from soupkit.experiments import runner
    from soupkit.config import MAIN_TABLE_SETTINGS
    from soupkit.experiments.run import RunSpec, main_table_options, soup_options

    nb = nbformat.read(runner.find_notebooks(Path(__file__).parent) / "02_main_table.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    defaults = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(cell.source).body}
    learning = ("learned_lr", "hyperplane_lr", "weight_decay", "epochs")
    assert all(defaults[key] is None for key in learning)  # overrides only: None is the method's default
    for key, value in MAIN_TABLE_SETTINGS.items():
        if key not in learning:
            assert (defaults[key] if key in defaults else getattr(RunSpec, key)) == value, key
    for method in soupkit.METHODS:
        notebook = soup_options(method, learned_lr=defaults["learned_lr"], hyperplane_lr=defaults["hyperplane_lr"],
                                weight_decay=defaults["weight_decay"], epochs=defaults["epochs"],
                                model_batch_size=defaults["model_batch_size"])
        assert main_table_options(method, num_models=32) == notebook, method
    assert main_table_options("mehl+", num_models=4)["model_batch_size"] == 4  # b above K: one block of K


def test_accuracy_is_printed_in_percent_as_the_notebooks(tiny_arch, capsys):
    directory, _ = tiny_arch
    main(["uniform", "--arch", "tiny-arch", "--pool", str(directory / "model_*.pt"), "--data", "cifar10",
          "--data-root", "x", "--workers", "0", "--out", str(directory / "uniform")])
    acc = soupkit.SoupResult.load(directory / "uniform").stats["test_accuracy"]
    assert f"test accuracy {100 * acc:.2f} % ->" in capsys.readouterr().out
