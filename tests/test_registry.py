"""The method registry: a method registered in one call is known to make_soup, the CLI, the notebooks' parameter
checks, the tables and the plots, with no other edit."""
from __future__ import annotations

from dataclasses import replace

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import soupkit  # noqa: E402
from soupkit.cli import main  # noqa: E402
from soupkit.experiments.params import check_methods  # noqa: E402
from soupkit.experiments.plots import family_handles, method_colour, method_style, plot_main_table  # noqa: E402
from soupkit.experiments.results import format_table, main_table  # noqa: E402
from soupkit.experiments.run import soup_options  # noqa: E402
from soupkit.methods.registry import (DEFAULTS, DISPLAY, METHODS, Method, config_for, display_name, register,  # noqa: E402
                                      table_order)
from soupkit.methods.result import SoupResult  # noqa: E402
from conftest import batches, finetunes, make_data, BNNet  # noqa: E402
from test_cli import tiny_arch  # noqa: E402,F401  (the fixture)


def first_model(model, pool, loader, cfg) -> SoupResult:
    """The toy method: the soup is the pool's first model."""
    weights = torch.zeros(len(pool))
    weights[0] = 1.0
    return SoupResult("first", pool.load(0, cfg.systems.device, cfg.systems.dtype), weights, stats={"epochs": 0})


TOY = Method(first_model, "the first model of the pool", "First model", "first", "first model", "tab:cyan", "X",
             defaults=soupkit.SoupConfig.from_options(seed=7), table_row=1, legend_row=0, constructs=False)


@pytest.fixture
def toy():
    register("first", TOY)
    try:
        yield TOY
    finally:
        METHODS.pop("first")


def test_a_registered_method_runs_and_has_its_defaults(toy):
    x, y = make_data()
    model, states = finetunes(BNNet, x, y, k=3, steps=5)
    result = soupkit.make_soup("first", model, states, batches(x, y), progress=False)
    assert torch.equal(result.coefficients, torch.tensor([1.0, 0.0, 0.0]))
    assert all(result.state_dict[k].equal(v) for k, v in states[0].items())
    assert DEFAULTS["first"].run.seed == 7 and config_for("first", seed=3).run.seed == 3
    assert "first" in soupkit.METHODS and DISPLAY["first"] == display_name("first") == "First model"


def test_register_refuses_a_taken_name_and_a_non_method(toy):
    with pytest.raises(ValueError, match="registered already"):
        register("first", TOY)
    with pytest.raises(TypeError, match="Method"):
        register("other", first_model)  # type: ignore[arg-type]
    assert register("first", TOY, replace_existing=True) is TOY


def test_a_registered_method_is_in_the_cli(toy, tiny_arch, capsys):  # noqa: F811
    directory, _ = tiny_arch
    assert main(["first", "--arch", "tiny-arch", "--pool", str(directory / "model_*.pt"), "--data", "cifar10",
                 "--data-root", "x", "--workers", "0", "--no-eval", "--out", str(directory / "first")]) == 0
    result = soupkit.SoupResult.load(directory / "first")
    assert result.name == "first" and result.coefficients.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_a_registered_method_is_in_the_notebook_checks(toy):
    assert check_methods("methods", "greedy,first") == ["greedy", "first"]
    assert check_methods("methods", "all", allow_all=True)[-1] == "first"


def test_a_registered_method_is_in_the_tables_and_the_plots(toy):
    records = [{"method": m, "test_accuracy": acc, "heldout_accuracy": acc, "seconds_per_epoch": None,
                "epochs": 0, "seconds_total": 1.0, "peak_memory_bytes": 2**20}
               for m, acc in (("greedy", 0.8), ("first", 0.7), ("best", 0.75))]
    table = main_table(records)
    # table_row 1 puts it after best (0) and, registered later, after uniform (1) had it been there
    assert table["method"].tolist() == ["best", "first", "greedy"]
    assert table.loc[table.method == "first", "Method"].item() == "First model"
    assert table_order(["greedy", "first", "uniform", "nosuch"]) == ["uniform", "first", "greedy", "nosuch"]
    assert method_style("first") == {"color": "tab:cyan", "marker": "X", "ls": "-"} and method_colour("first") == "tab:cyan"
    labels = [h.get_label() for h in family_handles(["first", "greedy"])]
    assert labels == ["first model", "Greedy-Soup"]  # legend_row 0: first in legends
    fig = plot_main_table(table, "toy")
    assert "First model" in [t.get_text() for t in fig.axes[0].get_yticklabels()]
    matplotlib.pyplot.close(fig)
    assert isinstance(table, pd.DataFrame)


def test_a_method_that_constructs_nothing_has_no_construction_cost_in_the_main_table(toy):
    records = [{"method": m, "test_accuracy": 0.7, "heldout_accuracy": 0.7, "seconds_per_epoch": 0.5,
                "epochs": 2, "seconds_total": 1.0, "peak_memory_bytes": 2**20} for m in ("first", "greedy")]
    table = main_table(records).set_index("method")
    cost = ["s / epoch", "#epoch", "construction (s)", "peak memory (MB)"]
    assert table.loc["first", cost].isna().all()  # TOY has constructs=False
    assert table.loc["greedy", cost].tolist() == [0.5, 2, 1.0, 1.0]
    shown = format_table(table.reset_index()).set_index("Method")
    assert shown.loc["First model", cost].tolist() == ["-"] * 4


LEARNED_TOY = Method(first_model, "the first model, as if learned", "Learned first", "first", "first model",
                     "tab:cyan", learned=True, defaults=soupkit.SoupConfig.from_options(lr=0.3, epochs=2.0))


def test_a_learned_method_gets_its_learning_settings_from_soup_options():
    register("toy-learned", LEARNED_TOY)
    try:
        assert soup_options("toy-learned") == {"lr": 0.3, "epochs": 2.0}  # None: the method's own defaults
        assert soup_options("toy-learned", learned_lr=0.1, epochs=1.0, ties="accept") == \
            {"lr": 0.1, "epochs": 1.0, "ties": "accept"}
        register("plain-first", replace(LEARNED_TOY, learned=False))
        assert soup_options("plain-first", learned_lr=0.1) == {}  # not learned: no learning settings
    finally:
        METHODS.pop("toy-learned")
        METHODS.pop("plain-first", None)
