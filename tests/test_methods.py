"""Invariants of every soup method on tiny models (CPU, seconds)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import soupkit
from soupkit import CheckpointPool, make_soup
from soupkit.methods.result import soup_logits
from conftest import BNNet, batches, make_data

FAST = dict(progress=False, inner_iterations=12)
LEARNED = ["learned", "learned+", "hl", "hl+", "mehl", "mehl+", "mehl+released"]


def heldout_acc(model, result, loader):
    return soupkit.evaluate(model, result, loader)


def test_registry_names():
    assert set(soupkit.METHODS) == {"best", "uniform", "greedy", "learned", "learned+", "hl", "hl+", "mehl",
                                    "mehl+", "mehl+released", "ensemble", "model_stock", "task_arithmetic"}
    with pytest.raises(ValueError, match="unknown soup method"):
        make_soup("nope", BNNet(), [BNNet().state_dict()], [])


def test_unknown_option_is_rejected(bn_setup):
    base, states, loader = bn_setup
    with pytest.raises(TypeError, match="learning_rate"):
        make_soup("hl", base, states, loader, learning_rate=0.1)


def test_uniform_is_the_mean(bn_setup):
    base, states, loader = bn_setup
    r = make_soup("uniform", base, states, loader, progress=False)
    for k, v in states[0].items():
        if v.is_floating_point():
            assert torch.allclose(r.state_dict[k], torch.stack([s[k] for s in states]).mean(0), atol=1e-6)
    assert torch.allclose(r.coefficients, torch.full((5,), 0.2))


@pytest.mark.parametrize("name", ["learned", "learned+"])
def test_learned_coefficients_lie_on_the_simplex(bn_setup, name):
    base, states, loader = bn_setup
    r = make_soup(name, base, states, loader, **FAST)
    c = r.coefficients
    assert c.shape == ((5, len(r.layer_names)) if name.endswith("+") else (5,))
    # the coefficients are the softmax over the K models of the learned logits, per layer for "+"
    softmax = torch.softmax(r.params["logits"], dim=0)
    assert torch.allclose(c, softmax if name.endswith("+") else softmax[:, 0], atol=1e-6)
    # and the soup is their combination: Σ_i c_i θ_i for one layer
    col = r.layer_names.index("fc2.weight") if r.layer_names else None
    ci = c[:, col] if col is not None else c
    assert torch.allclose(r.state_dict["fc2.weight"], sum(ci[i] * s["fc2.weight"] for i, s in enumerate(states)),
                          atol=1e-5)
    # learning from the uniform soup (softmax(0), logit scale 1) lowered the held-out loss it minimises
    uniform = make_soup("uniform", base, states, loader, progress=False)
    learned_logits, labels = soup_logits(base, r, loader)
    uniform_logits, _ = soup_logits(base, uniform, loader)
    learned_loss = nn.functional.cross_entropy(learned_logits * r.params["logit_scale"], labels).item()
    uniform_loss = nn.functional.cross_entropy(uniform_logits, labels).item()
    assert learned_loss < uniform_loss, (learned_loss, uniform_loss)


@pytest.mark.parametrize("name", ["hl", "hl+", "mehl", "mehl+"])
def test_hyperplane_coefficients_sum_to_one(bn_setup, name):
    base, states, loader = bn_setup
    r = make_soup(name, base, states, loader, model_batch_size=2, **FAST)
    assert torch.allclose(r.coefficients.sum(0), torch.ones_like(r.coefficients.sum(0)), atol=1e-5)
    # the soup really is Σ_i c_i θ_i (per layer): check one layer of the combined weights
    col = r.layer_names.index("fc2.weight") if r.layer_names else None
    c = r.coefficients[:, col] if col is not None else r.coefficients
    expected = sum(c[i] * s["fc2.weight"] for i, s in enumerate(states))
    assert torch.allclose(r.state_dict["fc2.weight"], expected, atol=1e-5)


def test_hyperplane_extrapolates_when_it_pays():
    # two separable linear classifiers, the second a scaled copy of the first: the loss keeps falling as the
    # weights grow, so the learned weight on the larger model must leave [0, 1]
    x, y = make_data(n=200, d=2, seed=3)
    y = (x[:, 0] > 0).long()
    w = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    states = [{"weight": w, "bias": torch.zeros(2)}, {"weight": 2 * w, "bias": torch.zeros(2)}]
    model = nn.Linear(2, 2)
    r = make_soup("hl", model, states, batches(x, y), progress=False, inner_iterations=60, lr=0.1)
    assert r.coefficients[1] > 1.0 and r.coefficients[0] < 0.0
    learned = make_soup("learned", model, states, batches(x, y), progress=False, inner_iterations=60, lr=0.1)
    # the same pull towards the larger model drives the softmax to its corner, which it cannot pass
    assert 0.9 < learned.coefficients[1] < 1.0 and 0.0 < learned.coefficients[0] < 0.1


@pytest.mark.parametrize("name", list(soupkit.METHODS))
def test_single_model_pool_returns_that_model(bn_setup, name):
    base, states, loader = bn_setup
    pool = CheckpointPool(states[:1], pretrained=base.state_dict())  # θ_0: Model Stock and task arithmetic need it
    # task arithmetic gives that model only at s = 1 (θ_0 + s·(θ_1 − θ_0)); the others ignore scale_grid
    r = make_soup(name, base, pool, loader, scale_grid=(1.0,), **FAST)
    assert torch.allclose(r.coefficients.reshape(-1)[:1], torch.ones(1))
    if r.state_dict is not None:
        for k, v in states[0].items():
            assert torch.allclose(r.state_dict[k].to(v.dtype), v, atol=1e-6), k
    assert soupkit.evaluate(base, r, loader) == soupkit.evaluate(base, states[0], loader)


def test_greedy_is_never_worse_than_best_on_heldout(bn_setup):
    base, states, loader = bn_setup
    for ties in ("reject", "accept"):
        greedy = make_soup("greedy", base, states, loader, progress=False, ties=ties)
        best = make_soup("best", base, states, loader, progress=False)
        assert heldout_acc(base, greedy, loader) >= heldout_acc(base, best, loader)
        assert greedy.stats["epochs"] == 2 * len(states) - 1
        assert best.stats["chosen"][0] == greedy.stats["chosen"][0]


def test_ensemble_averages_logits(bn_setup):
    base, states, loader = bn_setup
    r = make_soup("ensemble", base, states, loader, progress=False)
    assert r.state_dict is None
    logits = sum(soupkit.predict(base, s, loader)[0] for s in states) / len(states)
    labels = torch.cat([y for _, y in loader])
    assert soupkit.evaluate(base, r, loader) == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_mehl_with_b_equal_k_is_hl(bn_setup):
    base, states, loader = bn_setup
    for suffix in ("", "+"):
        hl = make_soup("hl" + suffix, base, states, loader, **FAST)
        mehl = make_soup("mehl" + suffix, base, states, loader, model_batch_size=len(states), **FAST)
        assert torch.allclose(hl.coefficients, mehl.coefficients, atol=1e-7)
        for k in hl.state_dict:
            assert torch.allclose(hl.state_dict[k], mehl.state_dict[k], atol=1e-7)
        assert hl.history == mehl.history


def test_mehl_holds_at_most_b_models(bn_setup):
    base, states, loader = bn_setup
    pool = CheckpointPool(states)
    r = make_soup("mehl+", base, pool, loader, model_batch_size=2, **FAST)
    assert r.stats["outer_iterations"] == 3  # ceil(5 / 2) blocks: one pass over the models
    assert pool.max_resident <= 2 + 1  # the block's b directions + the model being read into it
    hl_pool = CheckpointPool(states)
    make_soup("hl+", base, hl_pool, loader, **FAST)
    assert hl_pool.max_resident >= len(states)  # HL holds all K: the instrument does see models
    learned_pool = CheckpointPool(states)
    make_soup("learned+", base, learned_pool, loader, **FAST)
    assert learned_pool.max_resident >= len(states)


def test_prefetch_gives_the_same_soup(bn_setup):
    base, states, loader = bn_setup
    a = make_soup("mehl+", base, states, loader, model_batch_size=2, **FAST)
    b = make_soup("mehl+", base, states, loader, model_batch_size=2, prefetch=True, **FAST)
    assert torch.allclose(a.coefficients, b.coefficients, atol=1e-7)


def test_same_seed_same_result_and_seed_changes_block_order(bn_setup):
    base, states, loader = bn_setup
    a = make_soup("mehl", base, states, loader, model_batch_size=2, seed=1, **FAST)
    b = make_soup("mehl", base, states, loader, model_batch_size=2, seed=1, **FAST)
    c = make_soup("mehl", base, states, loader, model_batch_size=2, seed=2, **FAST)
    assert torch.equal(a.coefficients, b.coefficients) and a.history == b.history
    assert not torch.equal(a.coefficients, c.coefficients)


def test_batchnorm_buffers_follow_their_layer_weights(bn_setup):
    base, states, loader = bn_setup
    r = make_soup("hl+", base, states, loader, **FAST)
    c = r.coefficients[:, r.layer_names.index("bn.weight")]
    expected = sum(c[i] * s["bn.running_mean"] for i, s in enumerate(states))
    assert torch.allclose(r.state_dict["bn.running_mean"], expected, atol=1e-5)
    assert torch.equal(r.state_dict["bn.num_batches_tracked"], states[0]["bn.num_batches_tracked"])


@pytest.mark.parametrize("name", ["uniform", "greedy", "learned+", "hl+", "mehl+"])
def test_tied_parameters(tied_setup, name):
    base, states, loader = tied_setup
    r = make_soup(name, base, states, loader, model_batch_size=2, **FAST)
    assert torch.equal(r.state_dict["enc.weight"], r.state_dict["dec.weight"])
    if r.layer_names is not None:
        assert "dec.weight" not in r.layer_names  # one coefficient per shared tensor
    model = type(base)()
    model.load_state_dict(r.state_dict)
    assert soupkit.evaluate(base, r, loader) == soupkit.evaluate(model, dict(model.state_dict()), loader)


def test_stats_are_measured(bn_setup):
    base, states, loader = bn_setup
    r = make_soup("mehl+", base, states, loader, model_batch_size=2, **FAST)
    s = r.stats
    assert s["seconds_total"] > 0 and s["peak_memory_bytes"] >= 0 and s["memory_source"]
    assert s["epochs"] == pytest.approx(3 * 12 / len(loader))  # 3 blocks x 12 steps over 4 batches
    assert s["seconds_per_epoch"] == pytest.approx(s["seconds_total"] / s["epochs"])
    assert len(r.history) == 36
    assert 2 <= s["max_resident_models"] <= 3  # b directions (+ the model being read)
    learned = make_soup("learned+", base, states, loader, **FAST)
    assert learned.stats["max_resident_models"] == len(states)


def test_result_save_and_load(bn_setup, tmp_path):
    base, states, loader = bn_setup
    r = make_soup("hl+", base, states, loader, **FAST)
    back = soupkit.SoupResult.load(r.save(tmp_path / "run"))
    assert back.name == "hl+" and back.layer_names == r.layer_names and back.history == r.history
    assert torch.equal(back.coefficients, r.coefficients)
    assert all(torch.equal(back.state_dict[k], r.state_dict[k]) for k in r.state_dict)


def test_divergence_is_reported_not_written(bn_setup):
    base, states, loader = bn_setup
    bad = [(x * float("nan"), y) for x, y in loader]
    with pytest.raises(soupkit.DivergenceError, match="non-finite"):
        make_soup("mehl", base, states, bad, model_batch_size=2, **FAST)


def test_options_that_change_the_geometry(bn_setup):
    base, states, loader = bn_setup
    raw = make_soup("mehl+", base, states, loader, model_batch_size=2, decentralize=False, **FAST)
    assert "beta" in raw.params
    official = make_soup("mehl+", base, states, loader, model_batch_size=2, normalize_directions=True,
                         recenter=True, clip_grad_norm=1.0, **FAST)
    assert torch.allclose(official.coefficients.sum(0), torch.ones(official.coefficients.shape[1]), atol=1e-5)
    expected = sum(official.coefficients[i, 0] * s["fc1.weight"] for i, s in enumerate(states))
    assert torch.allclose(official.state_dict["fc1.weight"], expected, atol=1e-5)
    grouped = make_soup("hl+", base, states, loader, layer_grouping="module", **FAST)
    assert grouped.layer_names == ["fc1", "bn", "fc2"]


def test_early_stopping_keeps_the_best_checked_coefficients(bn_setup, monkeypatch):
    """With a select loader the soup is the one of the checked step with the best select accuracy, not the last."""
    import soupkit.engine.loop as learn
    from soupkit.engine.evaluation import accuracy, predict

    base, states, loader = bn_setup
    select = loader[:2]
    checked: list[float] = []
    real = learn.accuracy

    def recording(*args, **kwargs):
        checked.append(real(*args, **kwargs))
        return checked[-1]

    monkeypatch.setattr(learn, "accuracy", recording)
    # a large lr makes the select accuracy move between checks: here the best check is not the last one
    r = make_soup("hl+", base, states, loader, select_loader=select, eval_every=2, lr=1.0, **FAST)
    monkeypatch.setattr(learn, "accuracy", real)
    assert len(checked) == FAST["inner_iterations"] // 2 and max(checked) > checked[-1], checked
    assert accuracy(*predict(base, r.state_dict, select)) == pytest.approx(max(checked))
    last = make_soup("hl+", base, states, loader, lr=1.0, **FAST)  # same run, no selection: the last step
    assert accuracy(*predict(base, last.state_dict, select)) == pytest.approx(checked[-1])


def _tied_pair():
    """Two linear classifiers with the same predictions (the second is the first scaled by 2: same argmax),
    so the same held-out accuracy, but different weights; and a third, worse one (predicts class 0 only)."""
    x, y = make_data(n=120, d=2, seed=5)
    y = (x[:, 0] > 0).long()
    w = torch.tensor([[-1.0, 0.3], [1.0, 0.0]])
    states = [{"weight": w, "bias": torch.zeros(2)}, {"weight": 2 * w, "bias": torch.zeros(2)},
              {"weight": torch.zeros(2, 2), "bias": torch.tensor([1.0, 0.0])}]
    return nn.Linear(2, 2), states, batches(x, y)


def test_greedy_tries_the_higher_index_first_among_equal_accuracies():
    # model-soups' main.py sorts ascending by held-out accuracy, then reverses: among equal accuracies the
    # higher index comes first. Models 0 and 1 tie; their average has the same accuracy, so with strict
    # improvement the soup is whichever goes first: model 1 (the old key (-acc, j) gave model 0).
    model, states, loader = _tied_pair()
    r = make_soup("greedy", model, states, loader, progress=False)
    accs = r.stats["heldout_accuracies"]
    assert accs[0] == accs[1] > accs[2]
    assert r.stats["chosen"] == [1]
    assert torch.equal(r.state_dict["weight"], states[1]["weight"])
    assert r.history[0] == accs[1] and len(r.history) == 3  # tried 1, then 0, then 2
    accepting = make_soup("greedy", model, states, loader, progress=False, ties="accept")
    assert accepting.stats["chosen"] == [1, 0]


def test_best_keeps_the_first_index_among_equal_accuracies():
    model, states, loader = _tied_pair()
    r = make_soup("best", model, states, loader, progress=False)
    assert r.stats["chosen"] == [0] and torch.equal(r.state_dict["weight"], states[0]["weight"])


def test_learned_soup_defaults_are_model_soups():
    # learned_bylayer.py: AdamW lr 0.05, wd 0, 5 epochs, learned logit scale, constant lr (no warm-up)
    for name in ("learned", "learned+"):
        algo = soupkit.methods.registry.config_for(name).algorithm
        assert (algo.lr, algo.weight_decay, algo.epochs) == (0.05, 0.0, 5.0)
        assert algo.schedule == "constant" and algo.warmup == 0.0 and algo.logit_scale
        assert algo.clip_grad_norm is None and algo.batch_size is None
    for name in ("hl", "hl+", "mehl", "mehl+"):  # the paper's / released code's: cosine with 20 % warm-up
        cfg = soupkit.methods.registry.config_for(name)
        algo = cfg.algorithm
        assert (algo.lr, algo.weight_decay, algo.epochs, algo.schedule, algo.warmup) == (0.01, 0.0, 5.0, "cosine", 0.2)
        assert not (cfg.variant.normalize_directions or cfg.variant.recenter) and algo.clip_grad_norm is None


def test_mehl_released_defaults_are_the_released_option_set():
    cfg = soupkit.methods.registry.config_for("mehl+released")
    expected = soupkit.methods.registry.config_for("mehl+", normalize_directions=True, recenter=True, clip_grad_norm=1.0)
    assert cfg == expected
    algo = cfg.algorithm
    assert (algo.lr, algo.weight_decay, algo.epochs, algo.schedule, algo.warmup) == (0.01, 0.0, 5.0, "cosine", 0.2)
    assert soupkit.METHODS["mehl+released"].resumable


def test_mehl_released_equals_mehl_plus_with_the_released_options(bn_setup):
    base, states, loader = bn_setup
    released = make_soup("mehl+released", base, states, loader, model_batch_size=2, **FAST)
    options = make_soup("mehl+", base, states, loader, model_batch_size=2, normalize_directions=True,
                        recenter=True, clip_grad_norm=1.0, **FAST)
    assert released.name == "mehl+released" and options.name == "mehl+"
    assert torch.equal(released.coefficients, options.coefficients)
    assert released.layer_names == options.layer_names and released.history == options.history
    assert all(torch.equal(released.state_dict[k], options.state_dict[k]) for k in options.state_dict)
    plain = make_soup("mehl+", base, states, loader, model_batch_size=2, **FAST)
    assert not torch.equal(released.coefficients, plain.coefficients)  # the options do change the run


def test_the_hyperplane_variants_are_one_policy_object_each():
    """recenter / decentralize / normalize_directions pick the outer loop's policy; a combination that has no
    meaning is refused when the options are made, before any work."""
    from soupkit.methods.hyperplane import FixedCentre, RecentredSoup, centre_policy
    from soupkit.methods.registry import config_for

    assert centre_policy(config_for("mehl+")) == FixedCentre(decentralize=True, normalize_directions=False)
    assert centre_policy(config_for("mehl+", decentralize=False)) == FixedCentre(decentralize=False)
    assert centre_policy(config_for("mehl+released")) == RecentredSoup(normalize_directions=True)
    weights = torch.full((4, 2), 0.25)
    assert torch.equal(FixedCentre().reference(weights), weights)  # θ_i − θ̄ takes 1/K of every model
    assert torch.equal(FixedCentre(decentralize=False).reference(weights), torch.zeros(4, 2))
    assert torch.equal(RecentredSoup().initial_weights(4, 2, [[1, 3]])[:, 0], torch.tensor([0.0, 0.5, 0.0, 0.5]))
    with pytest.raises(ValueError, match="recenter"):
        config_for("mehl+", recenter=True, decentralize=False)


def test_accuracy_is_the_exact_fraction_and_refuses_no_examples():
    from soupkit.engine.evaluation import accuracy

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == 2 / 3   # a count over N, not a float32 mean
    assert accuracy(logits.repeat(10, 1)[:9], torch.tensor([0, 1, 0] * 3)) == 1.0
    with pytest.raises(ValueError, match="no examples"):
        accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
