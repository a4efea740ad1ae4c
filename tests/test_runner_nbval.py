"""make test's notebook checks: one dependency scheduler (runner.run_in_order) for papermill runs and nbval checks."""
from __future__ import annotations

import threading
import time

import nbformat
import pytest

from soupkit.experiments import runner


def _timed(durations: dict[str, float], fail: tuple[str, ...] = ()):
    """An ``execute`` for run_in_order that sleeps ``durations[name]`` and records (start, end) per name."""
    spans: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()
    t0 = time.perf_counter()

    def execute(k: int, name: str) -> float:
        start = time.perf_counter() - t0
        time.sleep(durations[name])
        with lock:
            spans[name] = (start, time.perf_counter() - t0)
        if name in fail:
            raise ValueError(f"{name} broke")
        return durations[name]

    return execute, spans


def test_a_notebook_starts_when_its_own_inputs_are_done_not_when_a_whole_group_is():
    # 03 is in 01's group (runner.stages) but 02 needs only 01: with groups, 02 would wait for 03 as well
    names = ["01_zoo", "02_main_table", "03_larger_model"]
    assert runner.stages(names) == [["01_zoo", "03_larger_model"], ["02_main_table"]]
    execute, spans = _timed({"01_zoo": 0.05, "02_main_table": 0.05, "03_larger_model": 0.6})
    timings, failed = runner.run_in_order(names, execute, jobs=2, say=lambda line: None)
    assert failed == {} and {n for n, _ in timings} == set(names)
    assert spans["02_main_table"][0] >= spans["01_zoo"][1]            # after its input
    assert spans["02_main_table"][0] < spans["03_larger_model"][1]    # beside 03, which it does not read


def test_one_job_runs_one_notebook_at_a_time_in_dependency_order():
    names = ["01_zoo", "02_main_table", "05_coefficients", "09_resnet"]
    execute, spans = _timed(dict.fromkeys(names, 0.02))
    runner.run_in_order(names, execute, jobs=1, say=lambda line: None)
    ordered = sorted(spans, key=lambda n: spans[n][0])
    assert ordered == ["01_zoo", "02_main_table", "05_coefficients", "09_resnet"]
    for a, b in zip(ordered, ordered[1:]):
        assert spans[b][0] >= spans[a][1]


def test_a_failure_skips_only_what_reads_it():
    names = ["01_zoo", "02_main_table", "05_coefficients", "09_resnet"]
    execute, spans = _timed(dict.fromkeys(names, 0.01), fail=("02_main_table",))
    lines: list[str] = []
    timings, failed = runner.run_in_order(names, execute, jobs=2, say=lines.append,
                                          failure_hint=lambda name: f"see {name}.log")
    assert {n for n, _ in timings} == {"01_zoo", "09_resnet"}
    assert failed["02_main_table"] == "ValueError: 02_main_table broke"
    assert failed["05_coefficients"] == "skipped: its input 02_main_table failed"
    assert "05_coefficients" not in spans
    assert lines == ["[2/4] 02_main_table FAILED (see 02_main_table.log)"]


def _checked_notebook(path, code: str, output: str) -> None:
    """A notebook whose one cell runs ``code`` with ``output`` stored as its (expected) stdout."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(code)
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=output)]
    nb.cells = [cell]
    nbformat.write(nb, path)


def test_nbval_checks_each_notebook_after_its_inputs_and_names_the_failures(tmp_path, capsys):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    # 01 writes what 02 reads (outputs go beside the copy, as the real notebooks' ../outputs); 03 prints the wrong
    # thing; 05 reads 02; 10 (EXTRA) is left out
    _checked_notebook(nbs / "01_zoo.ipynb", "import pathlib; pathlib.Path('../zoo.txt').write_text('z'); print('built')",
                      "built\n")
    _checked_notebook(nbs / "02_main_table.ipynb", "print(open('../zoo.txt').read())", "z\n")
    _checked_notebook(nbs / "03_larger_model.ipynb", "print(2)", "1\n")
    _checked_notebook(nbs / "05_coefficients.ipynb", "print('ok')", "ok\n")
    _checked_notebook(nbs / "10_seeds.ipynb", "raise SystemExit('must not run')", "")
    with pytest.raises(RuntimeError, match="- 03_larger_model: RuntimeError: nbval exit 1: 1 failed in") as err:
        runner.check_notebooks(nbs, jobs=2, cell_timeout=60)
    assert "01_zoo" not in str(err.value) and "02_main_table" not in str(err.value)
    out = capsys.readouterr().out
    assert "nbval 02_main_table done" in out and "nbval 05_coefficients done" in out and "10_seeds" not in out
    assert out.index("nbval 01_zoo done") < out.index("nbval 02_main_table started")
    assert "  03_larger_model: " in out and "[3/4] 03_larger_model FAILED" in out  # its report, prefixed
    # all pass once 03's stored output is what it prints; the CLI exits 0 and says so
    _checked_notebook(nbs / "03_larger_model.ipynb", "print(2)", "2\n")
    runner.main(["--nbval", "--notebooks", str(nbs), "--jobs", "2", "--nbval-cell-timeout", "60"])
    assert "nbval: 4 of 4 notebooks passed" in capsys.readouterr().out


def test_nbval_command_carries_the_cell_timeout():
    command = runner.nbval_command("notebooks/01_zoo.ipynb", 10800)
    assert command[1:4] == ["-m", "pytest", "-q"] and "--nbval" in command
    assert "--nbval-cell-timeout=10800" in command and command[-1] == "notebooks/01_zoo.ipynb"


@pytest.mark.parametrize("argv, message", [
    (["--nbval", "--nbval-cell-timeout", "0"], "argument --nbval-cell-timeout: takes a whole number of seconds >= 1"),
    (["--nbval", "--jobs", "0"], "argument --jobs: takes a whole number >= 1"),
])
def test_nbval_argument_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        runner.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
