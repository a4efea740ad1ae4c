"""make test: its nbval checks get a cell timeout long enough for notebook 01's zoo build on a loaded 2-core
machine, and the unit tests use the cores."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# notebook 01's zoo cell, measured here: about 1700 s with notebooks 03 and 09 on the other core, over 2000 s
# (nbval's default timeout) when two clean-clone runs shared the 2 cores
LONGEST_CELL_S = 2000


def _test_recipe() -> str:
    makefile = (ROOT / "Makefile").read_text()
    return makefile[makefile.index("\ntest: setup"):].split("\n\n")[0]


def test_nbval_gets_a_cell_timeout_with_room_above_the_longest_cell() -> None:
    makefile = (ROOT / "Makefile").read_text()
    value = re.search(r"^NBVAL_CELL_TIMEOUT \?= (\d+)$", makefile, flags=re.M)
    assert value is not None, "Makefile sets no NBVAL_CELL_TIMEOUT"
    assert int(value.group(1)) >= 3 * LONGEST_CELL_S
    recipe = _test_recipe()
    assert "soupkit.experiments.runner --nbval" in recipe  # every notebook is checked through runner.check_notebooks
    assert "--nbval-cell-timeout $(NBVAL_CELL_TIMEOUT)" in recipe
    assert "pytest" not in recipe.replace("-m pytest -q -n $(JOBS) tests", "")  # no nbval call of its own


def test_unit_tests_run_on_every_job() -> None:
    assert "$(BIN)/python -m pytest -q -n $(JOBS) tests" in _test_recipe()
