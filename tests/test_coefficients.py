"""Mixing-coefficient tables (Fig. 1): λ from the raw parameters, the soup they describe, summaries, plots."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import soupkit  # noqa: E402
from soupkit import CheckpointPool, make_soup  # noqa: E402
from soupkit.experiments.coefficients import (coefficient_explorer, coefficient_summary, coefficient_table,
                                              coefficients_from_params, combine, load_results,
                                              plot_coefficient_histograms, plot_layer_coefficients)

FAST = dict(progress=False, inner_iterations=15, lr=0.05)


@pytest.fixture(scope="module")
def soups(bn_setup):
    base, states, loader = bn_setup
    return {name: make_soup(name, base, states, loader, model_batch_size=2, **FAST)
            for name in ("mehl+", "learned+", "hl")}


@pytest.mark.parametrize("name", ["mehl+", "learned+", "hl"])
def test_coefficients_from_params_match_the_saved_weights(soups, name):
    r = soups[name]
    assert torch.allclose(coefficients_from_params(r), r.coefficients, atol=1e-6)


def test_decentralised_coefficients_sum_to_one_per_layer_and_extrapolate(soups):
    lam = coefficients_from_params(soups["mehl+"])
    assert lam.shape == (5, len(soups["mehl+"].layer_names))
    assert torch.allclose(lam.sum(dim=0), torch.ones(lam.shape[1]), atol=1e-6)
    assert (lam < 0).any()  # 15 steps at lr 0.05 already move some weights below 0
    learned = coefficients_from_params(soups["learned+"])
    assert learned.min() >= 0 and learned.max() <= 1


def test_beta_of_the_raw_ablation_is_the_coefficient(bn_setup):
    base, states, loader = bn_setup
    r = make_soup("mehl+", base, states, loader, model_batch_size=2, decentralize=False, **FAST)
    assert "beta" in r.params
    assert torch.allclose(coefficients_from_params(r), r.coefficients, atol=1e-7)
    assert not torch.allclose(r.coefficients.sum(dim=0), torch.ones(r.coefficients.shape[1]), atol=1e-4)


@pytest.mark.parametrize("name", ["mehl+", "learned+", "hl"])
def test_combining_the_models_with_lambda_reproduces_the_soup(bn_setup, soups, name):
    base, states, _ = bn_setup
    r = soups[name]
    layers = soupkit.layer_map(base, r.layer_names is not None)
    soup = combine(CheckpointPool(states), coefficients_from_params(r), layers)
    assert set(soup) == set(r.state_dict)
    for key, value in r.state_dict.items():
        assert torch.allclose(soup[key].to(value.dtype), value, atol=1e-5), key


def test_combine_handles_tied_weights(tied_setup):
    base, states, loader = tied_setup
    r = make_soup("mehl+", base, states, loader, model_batch_size=2, **FAST)
    soup = combine(CheckpointPool(states), r.coefficients, soupkit.layer_map(base, True))
    assert soup["dec.weight"] is soup["enc.weight"]
    for key, value in r.state_dict.items():
        assert torch.allclose(soup[key].float(), value, atol=1e-5), key


def test_table_has_one_row_per_method_model_layer(soups):
    table = coefficient_table({m: soups[m] for m in ("mehl+", "hl")})
    n_layers = len(soups["mehl+"].layer_names)
    assert len(table) == 5 * n_layers + 5
    row = table[(table.method == "mehl+") & (table.model == 3) & (table.layer_index == 2)].iloc[0]
    assert row.layer == soups["mehl+"].layer_names[2]
    assert row.coefficient == pytest.approx(soups["mehl+"].coefficients[3, 2].item())
    assert set(table[table.method == "hl"].layer) == {"all"}


def test_summary_by_hand():
    table = pd.DataFrame({"method": ["a"] * 4, "model": [0, 1, 0, 1], "layer_index": [0, 0, 1, 1],
                          "layer": ["x", "x", "y", "y"], "coefficient": [-0.5, 1.5, 0.02, 0.98]})
    row = coefficient_summary(table, near_zero=0.05).iloc[0]
    assert row["% < 0"] == 25 and row["% > 1"] == 25 and row["% outside [0, 1]"] == 50
    assert row["% |λ| < 0.05"] == 25 and row["max |Σλ − 1|"] == pytest.approx(0.0)
    assert (row["min"], row["max"]) == (-0.5, 1.5)


def test_load_results_names_the_notebook_that_writes_them(tmp_path, soups):
    with pytest.raises(FileNotFoundError, match="02_main_table"):
        load_results(tmp_path, ["mehl+"])
    soups["mehl+"].save(tmp_path / "mehl_plus")
    loaded = load_results(tmp_path, ["mehl+"])["mehl+"]
    assert torch.equal(loaded.coefficients, soups["mehl+"].coefficients)


def test_plots_and_explorer(soups):
    table = coefficient_table({m: soups[m] for m in ("mehl+", "learned+")})
    fig = plot_coefficient_histograms(table, "tiny")
    assert len(fig.axes) == 2 and "outside [0, 1]" in fig.axes[0].get_title()
    layer = soups["mehl+"].layer_names[0]
    assert len(plot_layer_coefficients(table, "mehl+", layer).axes[0].patches) == 5  # one bar per model
    explorer = coefficient_explorer(table)
    assert [w.description for w in explorer.children[:2]] == ["method", "layer"]
    explorer.children[1].value = layer  # the plot re-draws without error
    plt.close("all")
