"""Model Stock and task arithmetic, the two methods that need the pretrained model θ_0, and the pool's
``pretrained=``: closed forms on tiny nn.Linear models, their edge cases, the missing-θ_0 error, the wiring
into zoos, ``soupkit.experiments.run`` and the main table."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import soupkit
from soupkit import CheckpointPool, make_soup
from soupkit.config import TASK_ARITHMETIC_GRID, Algorithm, SoupConfig
from soupkit.errors import CheckpointError, MissingPretrainedError, OptionError, SoupkitError
from soupkit.methods.model_stock import model_stock_state, stock_ratio
from soupkit.methods.registry import METHODS, config_for, table_order
from soupkit.methods.task_arithmetic import choose_scale, scaled_soup
from conftest import batches, make_data, save_files
from test_cli import tiny_arch  # noqa: F401  (the fixture)

NEW = ("model_stock", "task_arithmetic")
QUIET = {"progress": False}


def linear_states(k: int, seed: int = 0, dtype=torch.float64, scale: float = 0.3, noise: float = 0.2):
    """θ_0 and k fine-tunes of an nn.Linear(4, 3): θ_0 plus a shared drift plus each one's own noise."""
    g = torch.Generator().manual_seed(seed)
    base = {n: t.detach().to(dtype) for n, t in nn.Linear(4, 3).state_dict().items()}
    shared = {n: torch.randn(t.shape, generator=g, dtype=dtype) for n, t in base.items()}
    states = [{n: t + scale * shared[n] + noise * torch.randn(t.shape, generator=g, dtype=dtype)
               for n, t in base.items()} for _ in range(k)]
    return base, states


def closed_form(base, states):
    """Model Stock by its definition: the mean cosine over the explicit pairs i != j, per tensor."""
    k = len(states)
    soup, ts, coss = {}, {}, {}
    for key, b in base.items():
        taus = [(s[key] - b).flatten() for s in states]
        pairs = [torch.nn.functional.cosine_similarity(taus[i], taus[j], dim=0).item()
                 for i, j in itertools.permutations(range(k), 2)]
        cos = sum(pairs) / len(pairs)
        t = k * cos / (1 + (k - 1) * cos)
        mean = sum(s[key] for s in states) / k
        soup[key], ts[key], coss[key] = t * mean + (1 - t) * b, t, cos
    return soup, ts, coss


# ---- Model Stock --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
def test_model_stock_equals_its_closed_form_and_the_streaming_identity_holds(k):
    base, states = linear_states(k, seed=k)
    want, want_t, want_cos = closed_form(base, states)
    soup, ts, coss, count = model_stock_state(base, iter(states))
    assert count == k
    for key in base:  # ‖Σ u_i‖² − K over K(K − 1) is the explicit mean over the pairs
        assert coss[key] == pytest.approx(want_cos[key], abs=1e-12)
        assert 0.0 < want_t[key] < 1.0 and ts[key] == pytest.approx(want_t[key], abs=1e-12)
        torch.testing.assert_close(soup[key], want[key], rtol=0, atol=1e-12)
    result = make_soup("model_stock", nn.Linear(4, 3).double(), CheckpointPool(states, pretrained=base), [],
                       dtype=torch.float64, **QUIET)
    for key in base:
        torch.testing.assert_close(result.state_dict[key], want[key], rtol=0, atol=1e-12)
    assert result.stats["t"] == pytest.approx(want_t) and result.stats["cos"] == pytest.approx(want_cos)
    assert result.layer_names == list(base) and result.coefficients.shape == (k, len(base))
    t = torch.tensor([want_t[n] for n in base], dtype=torch.float64)
    assert torch.allclose(result.coefficients.sum(0).double(), t, atol=1e-6)
    assert result.stats["epochs"] == 0 and result.stats["clipped"] == []


def test_model_stock_ratio_lies_in_zero_one_with_the_documented_edge_cases():
    for k in (2, 3, 8, 32):
        floor = -1 / (k - 1)
        for cos in [floor, floor / 2, -1e-9, 0.0, 1e-6, 0.2, 0.5, 0.9, 1.0, 1.0 + 1e-7]:
            t = stock_ratio(cos, k)
            assert 0.0 <= t <= 1.0, (k, cos)
            if cos <= 0:
                assert t == 0.0  # negative t (and the pole at -1/(K-1)) is clipped to θ_0
            elif cos <= 1:
                assert t == pytest.approx(k * cos / (1 + (k - 1) * cos))
        assert stock_ratio(1.0, k) == 1.0
    assert stock_ratio(-0.7, 1) == 1.0  # K = 1: no pairs, the one fine-tune
    with pytest.raises(ValueError):
        stock_ratio(0.5, 0)


def test_model_stock_of_equal_finetunes_is_their_mean():
    base, states = linear_states(1, seed=4)
    soup, ts, _, _ = model_stock_state(base, [states[0]] * 3)
    assert all(t == pytest.approx(1.0, abs=1e-12) for t in ts.values())
    for key in base:
        torch.testing.assert_close(soup[key], states[0][key], rtol=0, atol=1e-12)


def test_model_stock_zero_and_opposite_task_vectors():
    base, states = linear_states(2, seed=5)
    # the bias: fine-tune 0 left it at θ_0 (cosine 0 with the other: cos = 0, t = 0, θ_0);
    # the weight: opposite task vectors, cos = -1 = -1/(K-1), the formula's pole: clipped to t = 0
    states[0]["bias"] = base["bias"].clone()
    states[1]["weight"] = 2 * base["weight"] - states[0]["weight"]
    soup, ts, coss, _ = model_stock_state(base, states)
    assert coss["bias"] == 0.0 and coss["weight"] == pytest.approx(-1.0)
    assert ts == {"weight": 0.0, "bias": 0.0}
    for key in base:
        assert torch.equal(soup[key], base[key])
    untouched = [dict(base), dict(base)]  # no fine-tune moved anything: θ = θ_0 = θ̄
    soup, ts, coss, _ = model_stock_state(base, untouched)
    assert all(torch.equal(soup[k], base[k]) for k in base) and set(coss.values()) == {0.0}
    # three fine-tunes whose task vectors point slightly apart (mean cosine < 0): t = 0, listed as clipped
    ring = [{"p": torch.tensor(p, dtype=torch.float64)} for p in ([1.0, 0.0], [-0.4, 0.9], [-0.5, -0.8])]
    _, ts, coss, _ = model_stock_state({"p": torch.zeros(2, dtype=torch.float64)}, ring)
    assert -0.5 < coss["p"] < 0 and ts["p"] == 0.0
    result = make_soup("model_stock", _Vector(), CheckpointPool(ring, pretrained={"p": torch.zeros(2,
                       dtype=torch.float64)}), [], dtype=torch.float64, **QUIET)
    assert result.stats["clipped"] == ["p"] and torch.equal(result.state_dict["p"], torch.zeros(2).double())


class _Vector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(2, dtype=torch.float64))


def test_model_stock_streams_and_takes_integer_buffers_from_the_first_finetune(bn_setup):
    model, states, _ = bn_setup
    pool = CheckpointPool(states, pretrained=model.state_dict())
    result = make_soup("model_stock", model, pool, [], **QUIET)
    assert result.stats["max_resident_models"] == 1  # fine-tunes: one at a time (θ_0 and two sums beside it)
    assert torch.equal(result.state_dict["bn.num_batches_tracked"], states[0]["bn.num_batches_tracked"])
    uniform = make_soup("uniform", model, states, [], **QUIET).state_dict
    t = result.stats["t"]["fc1.weight"]
    theta0 = model.state_dict()["fc1.weight"]
    torch.testing.assert_close(result.state_dict["fc1.weight"], t * uniform["fc1.weight"] + (1 - t) * theta0)
    assert all(0.0 <= v <= 1.0 for v in result.stats["t"].values())
    assert result.stats["t_min"] <= result.stats["t_mean"] <= result.stats["t_max"]


# ---- task arithmetic ----------------------------------------------------------------------------------------
def test_task_arithmetic_at_one_is_the_uniform_soup_and_at_zero_the_pretrained_model(bn_setup):
    model, states, loader = bn_setup
    theta0 = model.state_dict()
    uniform = make_soup("uniform", model, states, loader, **QUIET).state_dict
    one = make_soup("task_arithmetic", model, CheckpointPool(states, pretrained=theta0), loader, scale_grid=[1.0],
                    **QUIET)
    zero = make_soup("task_arithmetic", model, CheckpointPool(states, pretrained=theta0), loader, scale_grid=(0.0,),
                     **QUIET)
    for key in uniform:
        assert torch.equal(one.state_dict[key], uniform[key]), key
        if theta0[key].is_floating_point():
            assert torch.equal(zero.state_dict[key], theta0[key]), key
    assert one.stats["scale"] == 1.0 and torch.allclose(one.coefficients, torch.full((5,), 0.2))
    assert zero.coefficients.sum() == 0.0 and one.stats["epochs"] == 1
    mean = CheckpointPool(states).center()
    for s in (0.0, 1.0):  # the pure function too, and λ = s / K on the sum of the task vectors
        soup = scaled_soup(theta0, mean, s)
        assert all(torch.equal(soup[k], (uniform if s else theta0)[k]) for k in mean if mean[k].is_floating_point())
    lam = 1.5 / len(states)
    by_lambda = theta0["fc2.weight"] + lam * sum(st["fc2.weight"] - theta0["fc2.weight"] for st in states)
    torch.testing.assert_close(scaled_soup(theta0, mean, 1.5)["fc2.weight"], by_lambda)


class _Threshold(nn.Module):
    """x [B, 1] -> logits [B, 2]: class 1 iff w·x + b > 0 (only the second row is learned: the first stays 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, 1))
        self.b = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.T + self.b


def test_task_arithmetic_chooses_the_scale_of_highest_heldout_accuracy_smallest_on_ties():
    # θ(s): boundary at x = s (θ_0: x = 0, the two fine-tunes: 0.5 and 1.5, their mean: 1); labels: x > 1.5.
    # On x = 0.25, 0.75, ..., 2.75 every s in (1.25, 1.75) is perfect: 1.3 ... 1.7 tie, the smallest wins.
    def state(c: float) -> dict:
        return {"w": torch.tensor([[0.0], [1.0]]), "b": torch.tensor([0.0, -c])}

    x = torch.arange(0.25, 3.0, 0.5).reshape(-1, 1)
    y = (x[:, 0] > 1.5).long()
    loader = [(x[:3], y[:3]), (x[3:], y[3:])]
    pool = CheckpointPool([state(0.5), state(1.5)], pretrained=state(0.0))
    result = make_soup("task_arithmetic", _Threshold(), pool, loader, **QUIET)
    assert result.stats["scales"] == list(TASK_ARITHMETIC_GRID)
    explicit = [float(((x[:, 0] - s > 0).long() == y).float().mean()) for s in TASK_ARITHMETIC_GRID]
    assert result.history == pytest.approx(explicit) == result.stats["heldout_accuracies"]
    assert result.stats["scale"] == 1.3 and result.stats["heldout_accuracy"] == 1.0 == max(result.history)
    assert result.stats["lambda"] == pytest.approx(0.65) and torch.allclose(result.coefficients, torch.full((2,), 0.65))
    assert soupkit.evaluate(_Threshold(), result, loader) == 1.0
    assert choose_scale([0.5, 0.9, 0.9], [2.0, 1.0, 0.5]) == 2  # ties: the smaller s, whatever the grid order


def test_scale_grid_is_an_option_of_task_arithmetic():
    assert config_for("task_arithmetic").algorithm.scale_grid == TASK_ARITHMETIC_GRID
    assert TASK_ARITHMETIC_GRID[0] == 0.0 and TASK_ARITHMETIC_GRID[-1] == 2.0 and len(TASK_ARITHMETIC_GRID) == 21
    assert config_for("task_arithmetic", scale_grid="0, 0.5,1").algorithm.scale_grid == (0.0, 0.5, 1.0)  # the CLI
    assert config_for("task_arithmetic", scale_grid=[1, 2]).algorithm.scale_grid == (1.0, 2.0)  # JSON: a list
    assert SoupConfig().algorithm.scale_grid is None and config_for("mehl+").algorithm.scale_grid is None
    for bad in ([], "a,b", [float("nan")], 3.0):
        with pytest.raises(OptionError, match="scale_grid"):
            Algorithm(scale_grid=bad)


# ---- the pool's θ_0 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_a_pool_without_pretrained_model_is_a_clear_soupkit_error(bn_setup, name):
    model, states, loader = bn_setup
    with pytest.raises(MissingPretrainedError, match=r"pretrained=") as err:
        make_soup(name, model, states, loader, **QUIET)
    assert isinstance(err.value, SoupkitError) and "zoo.pretrained_path" in str(err.value)
    with pytest.raises(MissingPretrainedError):
        CheckpointPool(states).load_pretrained()
    assert not CheckpointPool(states).has_pretrained


def test_pretrained_is_read_and_checked_like_a_checkpoint(bn_setup, tmp_path):
    model, states, _ = bn_setup
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    paths = save_files(states[:2], tmp_path)
    (tmp_path / "pre").mkdir()
    (file,) = save_files([theta0], tmp_path / "pre")
    pool = CheckpointPool(paths, pretrained=file)
    assert pool.has_pretrained and len(pool) == 2  # not one of the K
    got = pool.load_pretrained(dtype=torch.float64)
    assert got["fc1.weight"].dtype == torch.float64 and torch.equal(got["fc1.weight"].float(), theta0["fc1.weight"])
    assert got["bn.num_batches_tracked"].dtype == torch.int64
    wrong = {**theta0, "fc1.weight": torch.zeros(3, 8)}
    with pytest.raises(CheckpointError, match=r"pretrained state dict.*'fc1.weight' has shape \[3, 8\]"):
        CheckpointPool(states, pretrained=wrong)
    with pytest.raises(CheckpointError, match="missing key 'fc2.bias'"):
        CheckpointPool(states, pretrained={k: v for k, v in theta0.items() if k != "fc2.bias"})
    bad = {**theta0, "fc2.bias": torch.full((3,), float("nan"))}
    with pytest.raises(CheckpointError, match="pretrained"):
        CheckpointPool(states, pretrained=bad).load_pretrained()
    with pytest.raises(CheckpointError):
        CheckpointPool(states, pretrained=tmp_path / "missing.safetensors")


# ---- registry, zoos, experiments, tables ----------------------------------------------------------------------
def test_the_two_methods_are_registered_after_the_papers():
    for name, display in zip(NEW, ("Model Stock", "Task arithmetic")):
        m = METHODS[name]
        assert m.display == display and m.family == name and not m.learned and m.constructs
        others = [o for n, o in METHODS.items() if n != name]
        assert m.colour not in {o.colour for o in others} and m.family not in {o.family for o in others}
    assert table_order()[-2:] == list(NEW)
    assert not METHODS["model_stock"].uses_data and METHODS["task_arithmetic"].uses_data


@dataclass
class _FakeZoo:
    """What ``soupkit.experiments.run._run_on`` reads of a zoo."""

    paths: list
    pretrained_path: Path | None

    @property
    def records(self):
        return tuple({"index": i} for i in range(len(self.paths)))

    def make_model(self):
        from conftest import BNNet  # noqa: PLC0415

        return BNNet()


def test_run_records_both_methods_and_a_zoo_without_pretrained_model(bn_setup, tmp_path):
    from soupkit.experiments.results import main_table  # noqa: PLC0415
    from soupkit.experiments.run import NO_PRETRAINED, RunSpec, _run_on  # noqa: PLC0415

    model, states, _ = bn_setup
    paths = save_files(states, tmp_path)
    (tmp_path / "pre").mkdir()
    (theta0,) = save_files([model.state_dict()], tmp_path / "pre")
    x, y = make_data(seed=3)
    loaders = {"learn": batches(x, y), "heldout": batches(x, y), "test": batches(x, y), "select": None}
    records = []
    for name in NEW:
        for known in (theta0, None):
            spec = RunSpec("zoo", name, str(tmp_path / f"{name}-{known is not None}.json"))
            records.append(_run_on(spec, _FakeZoo(paths, known), loaders, False))
    ok = [r for r in records if r["status"] == "ok"]
    missing = [r for r in records if r["status"] == NO_PRETRAINED]
    assert len(ok) == len(missing) == 2 and all(r["test_accuracy"] is None for r in missing)
    assert all(0 < r["test_accuracy"] <= 1 for r in ok) and "scale" in ok[1] and "t_mean" in ok[0]
    table = main_table(ok + [{**missing[0], "method": "uniform"}])  # a uniform row standing in for the missing one
    assert table["method"].tolist() == ["uniform", *NEW]
    assert table.set_index("method").loc["uniform", "note"].startswith("no pretrained model")


def test_the_embedded_zoo_knows_its_pretrained_model_and_external_ones_do_not_by_default():
    from soupkit.zoo.base import BaseZoo  # noqa: PLC0415
    from soupkit.zoo.build import Zoo  # noqa: PLC0415
    from soupkit.zoo.sources import ExternalZoo, SourceSpec  # noqa: PLC0415

    assert BaseZoo.pretrained_path.fget(None) is None
    zoo = Zoo(Path("/z"), None, (), {"backbone": {"file": "backbone.safetensors"}})  # type: ignore[arg-type]
    assert zoo.pretrained_path == Path("/z/backbone.safetensors")
    spec = SourceSpec("model-soups", "/c", 2, "imagenet", "/d", "/s.json")
    assert ExternalZoo(Path("/o"), spec, ()).pretrained_path is None
    given = SourceSpec("model-soups", "/c", 2, "imagenet", "/d", "/s.json", pretrained="/c/zeroshot.pt")
    assert ExternalZoo(Path("/o"), given, ()).pretrained_path == Path("/c/zeroshot.pt")


def test_the_cli_runs_both_with_pretrained_and_explains_without(tiny_arch, capsys):  # noqa: F811
    from soupkit.cli import main  # noqa: PLC0415

    directory, _ = tiny_arch
    common = ["--arch", "tiny-arch", "--pool", str(directory / "model_[123].pt"), "--data", "cifar10",
              "--data-root", "x", "--workers", "0", "--no-eval", "--no-progress"]
    pretrained = ["--pretrained", str(directory / "model_0.pt")]  # any file of the architecture stands in for θ_0
    assert main(["model_stock", *common, *pretrained, "--out", str(directory / "ms")]) == 0
    assert main(["task_arithmetic", *common, *pretrained, "--option", "scale_grid=0.5,1,1.5",
                 "--out", str(directory / "ta")]) == 0
    ta = soupkit.SoupResult.load(directory / "ta")
    assert ta.stats["scales"] == [0.5, 1.0, 1.5] and ta.stats["scale"] in (0.5, 1.0, 1.5)
    assert len(soupkit.SoupResult.load(directory / "ms").stats["t"]) > 0
    with pytest.raises(SystemExit) as exit_:
        main(["model_stock", *common, "--out", str(directory / "none")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "pretrained=" in err and "--pretrained PATH" in err
