"""Notebook parameters are checked in one cell after the parameters cell: each mistake a user can make gives one
sentence naming the parameter, what it accepts and the fix; the committed notebooks carry that cell unrun."""
from __future__ import annotations

import os
import re

import nbformat
import pytest
from pathlib import Path

import soupkit
from soupkit.experiments import params, runner
from soupkit.runtime import progress
from soupkit.errors import MissingInputError, ParameterError, SoupkitError
from soupkit.experiments.params import Needs, check_inputs, check_methods, check_notebook, check_types, check_unknown

NOTEBOOKS = sorted(runner.find_notebooks(Path(__file__).parent).glob("[0-9][0-9]_*.ipynb"))
# calls that run soups or build zoos (and so write soupkit.runtime.progress lines to stderr, which nbval compares)
RUNS = re.compile(r"\b(run_methods?|run_ablations|\w+_study|build_zoo|prepare_zoo|bn_comparison)\(")
# cells that call them but only with a non-default parameter (nbval runs the defaults)
GUARDED = {("05_coefficients", "b9933520")}  # run_missing = False by default


def _toy(path, check="check_notebook(globals(), 'toy', methods='methods')"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(runner.KERNELSPEC)
    cell = nbformat.v4.new_code_cell("near_zero = 0.05\nmethods = 'mehl+'\nsteps = 3\nrun_missing = False\n"
                                     "out_dir = '.'")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(f"import soupkit\nfrom soupkit.experiments.params import *\n{check}"),
                nbformat.v4.new_code_cell("print(f'{near_zero:g}')")]
    nbformat.write(nb, path)
    return path


# ---- the sentences ----------------------------------------------------------------------------------------
def test_unknown_method_names_the_choices():
    with pytest.raises(ParameterError, match=r"^'nosuch' is not a method; choose from best, uniform, .*'methods'"):
        check_methods("methods", "mehl+,nosuch")
    with pytest.raises(ParameterError, match=r"did you mean 'mehl\+'"):
        check_methods("methods", "mehl++")
    with pytest.raises(ParameterError, match="names no method"):
        check_methods("methods", " , ")
    assert check_methods("methods", "all", allow_all=True) == list(soupkit.METHODS)
    with pytest.raises(ParameterError, match="'all' is not a method"):
        check_methods("methods", "all")
    assert issubclass(ParameterError, SoupkitError) and issubclass(ParameterError, ValueError)


def test_wrong_types_are_named_and_an_int_is_a_float():
    namespace = {"near_zero": "abc", "steps": 3}
    with pytest.raises(ParameterError, match=r"parameter 'near_zero' is 'abc' \(a string\) but takes a number like its "
                                             r"default 0\.05; pass e\.g\. -p near_zero 0\.05"):
        check_types(namespace, {"near_zero": 0.05, "steps": 1})
    namespace = {"near_zero": 1, "steps": 3}
    check_types(namespace, {"near_zero": 0.05, "steps": 1})
    assert namespace["near_zero"] == 1.0 and type(namespace["near_zero"]) is float
    check_types({"x": None}, {"x": 2000})  # a preset's null: the whole split
    for value, default in [(2000.0, 2000), (True, 2000), (1, True), (3, "0,1,2"), (None, "cpu")]:
        with pytest.raises(ParameterError, match="parameter 'x' is"):
            check_types({"x": value}, {"x": default})
    with pytest.raises(ParameterError, match=r"-r x 3"):  # a number given for a text parameter: pass it raw
        check_types({"x": 3}, {"x": "0,1,2"})


def test_a_misspelt_injected_parameter_is_refused():
    declared = {"near_zero": 0.05, "methods": "mehl+"}
    injected = "# Parameters\nnear_zeros = 0.1\nmethods = 'greedy'\n"
    namespace = {"_ih": ["", "near_zero = 0.05\nmethods = 'mehl+'", injected, "check(...)"], "near_zeros": 0.1}
    assert params.injected_names(namespace) == ["near_zeros", "methods"]
    with pytest.raises(ParameterError, match=r"^unknown parameter 'near_zeros' \(did you mean 'near_zero'\?\); "
                                             r"this notebook's parameters are near_zero, methods$"):
        check_unknown(params.injected_names(namespace), declared)
    assert params.injected_names({"_ih": ["", "x = 1"]}) == []  # nothing injected (nbval, JupyterLab)


def test_missing_inputs_name_the_notebook_to_run_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"out_dir": "out", "zoo_name": "zoo", "main_table_dir": "main_table", "run_missing": False}
    with pytest.raises(MissingInputError, match=r"^the zoo out/zoo .* is missing: run notebooks/01_zoo\.ipynb first"):
        check_inputs(namespace, [Needs.zoo()], "toy")
    (tmp_path / "out" / "zoo").mkdir(parents=True)
    with pytest.raises(MissingInputError, match=r"no zoo\.json or source\.json in it"):
        check_inputs(namespace, [Needs.zoo()], "toy")
    (tmp_path / "out" / "zoo" / "zoo.json").write_text("{}")
    soups = Needs("{out_dir}/{main_table_dir}/{method_dir}", "02_main_table", "the saved soup", ("result.json",),
                  unless="run_missing")
    with pytest.raises(MissingInputError, match=r"mehl_plus .*run notebooks/02_main_table\.ipynb first .*"
                                                r"or set run_missing = True"):
        check_inputs(namespace, [Needs.zoo(), soups], "toy", ["mehl+"])
    check_inputs({**namespace, "run_missing": True}, [Needs.zoo(), soups], "toy", ["mehl+"])
    assert issubclass(MissingInputError, FileNotFoundError) and issubclass(MissingInputError, SoupkitError)


def test_started_above_the_notebooks_folder_the_paths_mean_the_same(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "outputs" / "zoo").mkdir(parents=True)
    (tmp_path / "outputs" / "zoo" / "zoo.json").write_text("{}")
    _toy(tmp_path / "notebooks" / "toy.ipynb")
    monkeypatch.chdir(tmp_path)  # papermill notebooks/toy.ipynb ... from the repository root
    namespace = {"near_zero": 0.05, "methods": "mehl+", "steps": 3, "run_missing": False, "out_dir": "../outputs",
                 "zoo_name": "zoo"}
    check_notebook(namespace, "toy", methods="methods", needs=[Needs.zoo()])
    assert os.getcwd() == str(tmp_path / "notebooks")
    (tmp_path / "else" / "where").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "else" / "where")  # elsewhere: left there, and the sentence says where it read from
    with pytest.raises(MissingInputError, match="relative paths are read from .*else/where, start papermill in notebooks/"):
        check_notebook(namespace, "toy", needs=[Needs.zoo()])


def test_papermill_run_with_a_misspelt_parameter_fails_with_the_sentence(tmp_path, monkeypatch):
    import papermill

    monkeypatch.setenv(progress.ENV, "0")
    path = _toy(tmp_path / "toy.ipynb")
    with pytest.raises(papermill.PapermillExecutionError) as failed:
        papermill.execute_notebook(str(path), str(tmp_path / "out.ipynb"), parameters={"nea_zero": 0.1},
                                   cwd=str(tmp_path), progress_bar=False)
    assert failed.value.ename == "ParameterError"
    assert failed.value.evalue.startswith("unknown parameter 'nea_zero' (did you mean 'near_zero'?); this notebook's "
                                          "parameters are near_zero, methods, steps, run_missing, out_dir")


# ---- the committed notebooks --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_checks_its_parameters_right_after_them(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    check = code[1]
    assert check.id == "check-parameters" and f'check_notebook(globals(), "{path.stem}"' in check.source
    # without outputs: it prints nothing when the parameters are right, so nbval expects nothing from it
    assert check.outputs == []
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert nb.metadata["kernelspec"] == runner.KERNELSPEC
    assert isinstance(nb.metadata["soupkit"]["parameters"], dict)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_defaults_pass_their_own_check(path, monkeypatch):
    monkeypatch.setattr(params, "check_inputs", lambda *a, **k: None)  # inputs: other tests (a clone has none)
    monkeypatch.setenv(progress.ENV, "0")
    monkeypatch.chdir(runner.find_notebooks(Path(__file__).parent))
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    namespace: dict = {}
    exec(code[0].source, namespace)  # noqa: S102  (the notebook's own parameters cell)
    exec(code[1].source.replace("import os\n", "").replace("os.environ", "{}"), namespace)  # noqa: S102


@pytest.mark.parametrize("preset", ["smoke", "embedded", "paper", "seeds", "rehearsal"])
def test_every_preset_value_has_its_parameters_type(preset):
    spec = runner.load_preset(preset)
    for path in NOTEBOOKS:
        defaults = params.declared_parameters(path)
        given = {k: v for k, v in {**spec["common"], **(spec["notebooks"].get(path.stem) or {})}.items()
                 if k in defaults}
        check_types(given, defaults)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cells_that_print_progress_are_not_compared_by_nbval(path):
    """soupkit.runtime.progress writes to stderr, and nbval compares stderr streams of every cell it checks: every cell
    that runs soups or builds zoos must be ``# NBVAL_IGNORE_OUTPUT`` (or run them only off the defaults)."""
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code" and RUNS.search(cell.source) and (path.stem, cell.get("id")) not in GUARDED:
            assert cell.source.startswith("# NBVAL_IGNORE_OUTPUT"), (path.stem, cell.get("id"), cell.source[:80])


def test_nbval_compares_stderr_but_not_unrun_cells():
    """What the test above relies on, read from nbval itself (the version in this environment)."""
    import inspect

    from nbval import plugin

    source = inspect.getsource(plugin)
    assert "unrun = self.cell.execution_count is None" in source  # an unrun reference cell is not compared
    assert "'name'," in inspect.getsource(plugin.IPyNbFile.__init__)  # the key is skipped, ...
    assert "output.name: output.text" in inspect.getsource(plugin.transform_streams_for_comparison)  # ... stderr kept


def test_progress_lines_go_to_stderr_only_when_enabled(monkeypatch, capsys):
    monkeypatch.delenv(progress.ENV, raising=False)
    progress.report("quiet")
    progress.enable()
    progress.report("mehl+: ok")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "[soupkit] mehl+: ok\n"
    monkeypatch.setenv(progress.ENV, "0")
    progress.enable()  # the environment's choice stays
    assert not progress.enabled()


def test_notebook_learning_settings_are_overrides_not_copies_of_the_defaults() -> None:
    """The notebooks pass overrides only: their learning rates, weight decay and epochs are None, which
    soup_options, run_ablations and SideStudySettings turn into each method's own default (soupkit.config)."""
    import papermill

    from soupkit.config import HYPERPLANE_DEFAULTS, LEARNED_DEFAULTS
    from soupkit.experiments.ablations import Setting
    from soupkit.experiments.params import LIBRARY_DEFAULTS
    from soupkit.experiments.run import soup_options
    from soupkit.experiments.runner import NOTEBOOKS, find_notebooks

    folder = find_notebooks(Path(__file__).parent)
    seen = 0
    for name in NOTEBOOKS:
        declared = papermill.inspect_notebook(str(folder / f"{name}.ipynb"))
        for key in LIBRARY_DEFAULTS:
            if key in declared:
                assert declared[key]["default"] == "None", f"{name}: {key} = {declared[key]['default']}"
                seen += 1
    assert seen >= 20  # 02-10 declare them
    none = dict.fromkeys(LIBRARY_DEFAULTS)
    learned, hyperplane = LEARNED_DEFAULTS.algorithm, HYPERPLANE_DEFAULTS.algorithm
    assert soup_options("learned+", **none) == {"lr": learned.lr, "epochs": learned.epochs}
    assert soup_options("mehl+", **none, model_batch_size=8) == {
        "lr": hyperplane.lr, "weight_decay": hyperplane.weight_decay, "epochs": hyperplane.epochs, "model_batch_size": 8}
    assert Setting(epochs=None) == Setting(epochs=HYPERPLANE_DEFAULTS.algorithm.epochs)


def test_a_none_learning_setting_is_type_checked_against_the_library_default() -> None:
    namespace = {"learned_lr": None, "epochs": 2}
    check_types(namespace, {"learned_lr": None, "epochs": None})
    assert namespace == {"learned_lr": None, "epochs": 2.0}  # None allowed; an int becomes a float
    with pytest.raises(ParameterError, match="learned_lr"):
        check_types({"learned_lr": "fast"}, {"learned_lr": None})
