"""Same seed, same machine: the same coefficients, losses and accuracies, whatever the caller's RNG did."""
from __future__ import annotations

import pytest
import torch

import soupkit
from soupkit import make_soup
from conftest import make_data

FAST = dict(progress=False, inner_iterations=6, model_batch_size=2)


@pytest.fixture()
def shuffling_loader():
    x, y = make_data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)


@pytest.mark.parametrize("name", ["mehl+", "hl", "learned+", "greedy"])
def test_same_seed_same_result_even_with_a_shuffling_loader(bn_setup, shuffling_loader, name):
    base, states, loader = bn_setup
    runs = []
    for caller_seed in (0, 123):  # the caller's own RNG must not matter
        torch.manual_seed(caller_seed)
        r = make_soup(name, base, states, shuffling_loader, seed=7, **FAST)
        runs.append((r, soupkit.evaluate(base, r, loader)))
    (a, acc_a), (b, acc_b) = runs
    assert torch.equal(a.coefficients, b.coefficients)
    assert a.history == b.history and acc_a == acc_b
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_the_seed_picks_the_shuffle_order(bn_setup, shuffling_loader):
    base, states, _ = bn_setup
    a = make_soup("hl", base, states, shuffling_loader, seed=1, **FAST)
    b = make_soup("hl", base, states, shuffling_loader, seed=2, **FAST)
    assert a.history != b.history  # HL has no block order: only the loader's shuffle differs


def test_a_run_leaves_the_callers_rng_where_it_was(bn_setup, shuffling_loader):
    base, states, _ = bn_setup
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    make_soup("mehl+", base, states, shuffling_loader, seed=5, **FAST)
    assert torch.equal(torch.rand(3), expected)
