"""The notebook runner's presets and execution, and the paper-style tables built from records."""
from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest
from pathlib import Path

from soupkit.experiments import runner
from soupkit.experiments.run import soup_options
from soupkit.experiments.results import (append_jsonl, main_table, paper_table, ratio, read_jsonl, format_table,
                                         with_test_intervals, with_wilson_intervals, write_csv)
from soupkit.experiments.stats import bootstrap_accuracy, wilson_interval


def test_presets_load_and_bad_ones_are_explained(tmp_path):
    assert runner.load_preset("embedded")["common"]["num_models"] == 32
    assert runner.load_preset("smoke")["notebooks"]["02_main_table"]["heldout_size"] < 1000
    with pytest.raises(FileNotFoundError, match="known presets"):
        runner.load_preset("nope")
    (tmp_path / "blocks.yaml").write_text("mehl_plus: {lr: 0.01}\n")
    with pytest.raises(ValueError, match="not a runner preset"):
        runner.load_preset(str(tmp_path / "blocks.yaml"))


@pytest.mark.parametrize("name", ["smoke", "embedded", "paper"])
def test_every_preset_parameter_is_declared_by_its_notebook(name):
    import papermill

    preset = runner.load_preset(name)
    declared = {n: set(papermill.inspect_notebook(str(runner.find_notebooks(Path(__file__).parent) / f"{n}.ipynb"))) for n in runner.NOTEBOOKS}
    for notebook, params in preset["notebooks"].items():
        assert notebook in declared, f"{name}: unknown notebook {notebook}"
        assert set(params or {}) <= declared[notebook], (name, notebook, set(params) - declared[notebook])
    for key in preset["common"]:  # a common key no notebook declares would be silently dropped
        assert any(key in d for d in declared.values()), (name, key)


def test_run_notebooks_passes_only_declared_parameters(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("num_models = 1\nout_dir = 'x'\nfigures_dir = 'y'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print(num_models * 10, out_dir.endswith('run'))")]
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "01_zoo.ipynb")
    preset = tmp_path / "p.yaml"
    preset.write_text("common: {num_models: 3, unrelated: 1}\n")
    monkeypatch.chdir(tmp_path / "nbs")
    timings = runner.run_notebooks(str(preset), tmp_path / "run")
    assert [name for name, _ in timings] == ["01_zoo"]
    executed = nbformat.read(tmp_path / "run" / "notebooks" / "01_zoo.ipynb", as_version=4)
    assert executed.cells[-1].outputs[0]["text"].strip() == "30 True"
    runner.run_notebooks(str(preset), tmp_path / "run", update_committed=True)
    committed = nbformat.read(tmp_path / "nbs" / "01_zoo.ipynb", as_version=4)
    assert committed.cells[-1].outputs  # the source now carries the outputs ...
    assert str(tmp_path) not in json.dumps(committed.metadata)  # ... but no path of this machine
    assert committed.metadata["kernelspec"] == runner.KERNELSPEC  # what JupyterLab writes: opening changes nothing
    assert committed.metadata["soupkit"]["parameters"]["num_models"] == 3  # the run's parameters, not a cell


def _records():
    rows = []
    for m, acc, sec, mem in [("best", .80, 1, 1), ("greedy", .82, 10, 2), ("learned+", .83, 40, 26e6),
                             ("mehl+", .84, 8, 2e6), ("uniform", .79, 0, 0)]:
        rows.append(dict(method=m, test_accuracy=acc, heldout_accuracy=acc + .01, seconds_per_epoch=sec / 5,
                         epochs=5, seconds_total=sec, peak_memory_bytes=mem))
    return rows


def test_main_table_orders_methods_and_puts_the_paper_beside(tmp_path):
    table = main_table(_records(), paper_table("table1_vitb32_imagenet"))
    assert list(table["method"]) == ["best", "uniform", "greedy", "learned+", "mehl+"]  # the paper's order
    row = table.set_index("method").loc["mehl+"]
    assert row["test acc (%)"] == pytest.approx(84.0) and row["paper acc (%)"] == pytest.approx(81.62)
    assert pd.isna(table.set_index("method").loc["best", "construction (s)"])  # "-" as in the paper
    assert ratio(pd.DataFrame(_records()), "peak_memory_bytes") == pytest.approx(13.0)
    shown = format_table(table, digits=2)
    assert shown.loc[0, "s / epoch"] == "-"
    write_csv(table, tmp_path / "t.csv")
    assert pd.read_csv(tmp_path / "t.csv").shape == table.shape


def _predictions(path, right: int, wrong: int) -> None:
    """A predictions file (label,prediction) with ``right`` correct then ``wrong`` incorrect images."""
    rows = [f"{i % 3},{i % 3}" for i in range(right)] + [f"{i % 3},{(i + 1) % 3}" for i in range(wrong)]
    path.write_text("label,prediction\n" + "\n".join(rows) + "\n")


def test_main_table_intervals_come_from_the_predictions_files(tmp_path):
    # two runs as run_methods writes them: <dir>/<method>.json beside <dir>/<method>.predictions.csv
    _predictions(tmp_path / "greedy.predictions.csv", 160, 40)  # 0.80 on 200 images
    _predictions(tmp_path / "mehl+.predictions.csv", 200, 0)  # all right: [100, 100]
    records = [dict(r, test_accuracy=acc, test_images=200, status="ok", predictions=f"{r['method']}.predictions.csv")
               for r, acc in zip([r for r in _records() if r["method"] in ("greedy", "mehl+")], (0.80, 1.0))]
    records.append(dict(method="learned+", status="did not fit", test_accuracy=None, heldout_accuracy=None,
                        memory_cap_mb=64, peak_memory_bytes=7e7))
    table = main_table(records, paper_table("table1_vitb32_imagenet"), record_dir=tmp_path).set_index("method")
    greedy = table.loc["greedy"]
    expected = bootstrap_accuracy([True] * 160 + [False] * 40).scaled(100)
    assert (greedy["test low (%)"], greedy["test high (%)"]) == pytest.approx((expected.low, expected.high))
    assert greedy["test acc (%)"] == pytest.approx(80.0)
    assert greedy["test low (%)"] < greedy["test acc (%)"] < greedy["test high (%)"]
    assert 3 < greedy["test high (%)"] - greedy["test low (%)"] < 15  # about 2 * 1.96 * sqrt(.8 * .2 / 200) = 11
    assert (table.loc["mehl+", "test low (%)"], table.loc["mehl+", "test high (%)"]) == (100.0, 100.0)
    assert pd.isna(table.loc["learned+", "test low (%)"]) and pd.isna(table.loc["learned+", "test high (%)"])
    assert table.loc["learned+", "note"].startswith("did not fit")
    # a record_path entry works without record_dir; without either (or without a file) the bounds are NaN
    located = main_table([dict(records[0], record_path=str(tmp_path / "greedy.json"))]).loc[0]
    assert located["test low (%)"] == pytest.approx(expected.low)
    assert main_table(records[:1])[["test low (%)", "test high (%)"]].isna().all().all()
    assert main_table(_records(), record_dir=tmp_path / "nothing")["test low (%)"].isna().all()
    # bounds already in the records (a study's records.csv) are kept as they are
    kept = with_test_intervals([dict(records[0], test_low=0.5, test_high=0.9)], record_dir=tmp_path)
    assert kept.loc[0, ["test_low", "test_high"]].tolist() == [0.5, 0.9]
    # rounded with the accuracies, "-" where there is no interval
    shown = format_table(table.reset_index(), digits=2).set_index("Method")
    assert shown.loc["Greedy-Soup", "test low (%)"] == round(expected.low, 2)
    assert shown.loc["Learned-Soup+", "test low (%)"] == "-"


def test_stale_predictions_give_no_interval(tmp_path):
    _predictions(tmp_path / "greedy.predictions.csv", 150, 50)  # 0.75: not the record's 0.80
    record = dict(_records()[1], test_accuracy=0.80, test_images=200)
    with pytest.warns(UserWarning, match="do not match the record"):
        table = main_table([record], record_dir=tmp_path)
    assert pd.isna(table.loc[0, "test low (%)"])


def test_wilson_columns_for_accuracies_without_predictions():
    zoo = pd.DataFrame({"index": [0, 1], "test_acc": [0.5, 0.8]})
    out = with_wilson_intervals(zoo, 100)
    assert out["test_acc_low"][0] == pytest.approx(0.403832, abs=1e-6)
    assert out["test_acc_high"][1] == pytest.approx(wilson_interval(0.8, 100).high)
    assert list(with_wilson_intervals(zoo, None).columns) == ["index", "test_acc"]


def test_jsonl_round_trip(tmp_path):
    for r in _records():
        append_jsonl(r, tmp_path / "r.jsonl")
    assert read_jsonl(tmp_path / "r.jsonl") == json.loads(json.dumps(_records()))


def test_soup_options_per_method():
    assert soup_options("learned+", learned_lr=0.2)["lr"] == 0.2
    mehl = soup_options("mehl+", hyperplane_lr=0.02, weight_decay=0.1, model_batch_size=4)
    assert mehl == dict(lr=0.02, weight_decay=0.1, epochs=5.0, model_batch_size=4)
    assert "model_batch_size" not in soup_options("hl", model_batch_size=4)
    assert soup_options("greedy", ties="accept") == {"ties": "accept"}


def _notebook(path, code: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("out_dir = 'x'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, path)


def test_parallel_runner_keeps_dependencies_and_isolates_failures(tmp_path, monkeypatch, capsys):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    # 01 writes a file 02 reads; 03 fails; 05 depends on 02 and succeeds; nothing depends on 03
    _notebook(nbs / "01_zoo.ipynb", "import time, pathlib; time.sleep(1); pathlib.Path(out_dir, 'zoo.txt').write_text('z')")
    _notebook(nbs / "02_main_table.ipynb", "import pathlib; assert pathlib.Path(out_dir, 'zoo.txt').read_text() == 'z'")
    _notebook(nbs / "03_larger_model.ipynb", "raise ValueError('boom')")
    _notebook(nbs / "05_coefficients.ipynb", "print('ok')")
    (tmp_path / "p.yaml").write_text("common: {}\n")
    monkeypatch.chdir(nbs)
    with pytest.raises(RuntimeError, match="03_larger_model: PapermillExecutionError"):
        runner.run_notebooks(str(tmp_path / "p.yaml"), tmp_path / "run", jobs=2)
    log = capsys.readouterr().out
    assert "02_main_table done" in log and "05_coefficients done" in log and "03_larger_model FAILED" in log
    assert log.index("01_zoo done") < log.index("02_main_table (p) started") < log.index("05_coefficients (p) started")
    # a failed input skips what reads it
    _notebook(nbs / "01_zoo.ipynb", "raise ValueError('no zoo')")
    with pytest.raises(RuntimeError, match="02_main_table: skipped: its input 01_zoo failed"):
        runner.run_notebooks(str(tmp_path / "p.yaml"), tmp_path / "run2", jobs=2, only=["01_zoo", "02_main_table"])


def test_stages_put_each_notebook_after_its_inputs():
    groups = runner.stages()
    position = {n: i for i, group in enumerate(groups) for n in group}
    assert set(position) == set(runner.NOTEBOOKS)
    for name, deps in runner.DEPENDS.items():
        assert all(position[d] < position[name] for d in deps)
    assert runner.stages(["02_main_table", "05_coefficients"]) == [["02_main_table"], ["05_coefficients"]]


def test_params_of_one_notebook_for_papermill(capsys):
    params = runner.notebook_parameters("paper", "02_main_table")
    assert params["model_batch_size"] == 18 and params["device"] == "cuda"
    assert "zoo_source" not in params  # 01's parameter: 02 does not declare it
    assert runner.notebook_parameters("paper", "03_larger_model")["model_batch_size"] == 8  # its own block wins
    runner.main(["--preset", "smoke", "--params", "02_main_table"])
    import yaml

    assert yaml.safe_load(capsys.readouterr().out)["heldout_size"] == 200
    with pytest.raises(ValueError, match="unknown notebook"):
        runner.notebook_parameters("paper", "10_nope")


def test_main_table_shows_a_diverged_run_without_accuracy():
    records = _records() + [dict(method="mehl+released", status="diverged", test_accuracy=None,
                                 heldout_accuracy=None, peak_memory_bytes=None, seconds_total=None, epochs=None)]
    table = main_table(records).set_index("method")
    assert table.loc["mehl+released", "note"] == "diverged (non-finite loss)"
    assert pd.isna(table.loc["mehl+released", "test acc (%)"])
    assert table.loc["mehl+", "note"] == ""


# ---- argument errors are one sentence, before anything is created ---------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--only", "05_nosuch"], "unknown notebook '05_nosuch'; available: 01_zoo, 02_main_table"),
    (["--preset", "nosuch"], "preset 'nosuch' not found"),
    (["--jobs", "0"], "argument --jobs: takes a whole number >= 1"),
    (["--jobs", "two"], "argument --jobs: takes a whole number >= 1"),
    (["--params", "05_nosuch"], "unknown notebook '05_nosuch'"),
])
def test_runner_argument_errors_are_one_line_and_create_nothing(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        runner.main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert err.startswith("python -m soupkit.experiments.runner: error: ")
    assert not (tmp_path / "run").exists()


def test_runner_help_names_its_command_and_the_kernel(capsys):
    with pytest.raises(SystemExit):
        runner.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m soupkit.experiments.runner") and "Jupyter kernel the notebooks run on" in out


def test_commit_copy_pins_the_kernelspec_and_records_the_parameters(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["papermill"] = {"input_path": str(tmp_path / "a.ipynb"), "output_path": str(tmp_path / "b.ipynb")}
    injected = nbformat.v4.new_code_cell("# Parameters\nout_dir = '../x'\n")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells = [nbformat.v4.new_code_cell("out_dir = '../outputs'"), injected]
    nbformat.write(nb, tmp_path / "executed.ipynb")
    runner._commit_copy(tmp_path / "executed.ipynb", tmp_path / "02_main_table.ipynb", "embedded", {"out_dir": "../x"})
    committed = nbformat.read(tmp_path / "02_main_table.ipynb", as_version=4)
    assert committed.metadata["kernelspec"] == runner.KERNELSPEC
    assert committed.metadata["soupkit"] == {"preset": "embedded", "parameters": {"out_dir": "../x"}}
    assert len(committed.cells) == 1 and str(tmp_path) not in json.dumps(committed.metadata)


def test_kernel_stderr_reaches_the_console_line_by_line_with_the_notebook_name(capsys):
    import threading

    stream = runner._Prefixed("02_main_table", threading.Lock())
    stream.write("[soupkit] best: ok")
    assert capsys.readouterr().err == ""  # whole lines only
    stream.write(", 1 s\n[soupkit] greedy")
    stream.close()
    assert capsys.readouterr().err == "  02_main_table: [soupkit] best: ok, 1 s\n  02_main_table: [soupkit] greedy\n"


def test_the_notebooks_folder_is_found_from_the_working_folder_or_given(tmp_path, monkeypatch, capsys):
    repo = runner.find_notebooks(Path(__file__).parent)
    assert (repo / "01_zoo.ipynb").is_file() and (repo.parent / "presets" / "embedded.yaml").is_file()
    assert runner.find_notebooks(repo / "..") == repo == runner.find_notebooks(repo)
    monkeypatch.chdir(tmp_path)  # no notebooks in or above a temporary folder
    with pytest.raises(FileNotFoundError, match="--notebooks"):
        runner.find_notebooks()
    with pytest.raises(SystemExit):
        runner.main(["--stages"])
    assert "no soupkit notebooks folder" in capsys.readouterr().err
    runner.main(["--stages", "--notebooks", str(repo)])
    assert "notebooks/01_zoo.ipynb" in capsys.readouterr().out
    assert runner.load_preset("embedded", repo)["common"]["num_models"] == 32
