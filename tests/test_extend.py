"""Warm starts (``warm_start=``, ``--extend``): a finished MEHL-Soup(+) result grown with new checkpoints starts at
its own soup, visits the new models first, leaves the α of old models no block visits bit for bit, and refuses a
pool that does not begin with its models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import soupkit
from soupkit import CheckpointPool, make_soup
from soupkit.engine.layers import layer_map
from soupkit.errors import OptionError, ResumeError, WarmStartError
from soupkit.methods import hyperplane
from soupkit.methods.run_dir import RunDir
from conftest import BNNet, batches, finetunes, install_tiny_arch, make_data, save_files

FAST = dict(progress=False, inner_iterations=4, model_batch_size=2, seed=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Six BNNet fine-tunes as files, the held-out batches, and the states themselves."""
    x, y = make_data()
    _, states = finetunes(BNNet, x, y, k=6)
    paths = save_files(states, tmp_path_factory.mktemp("pool"))
    return paths, states, batches(x, y)


def _theta(states: list[dict], alpha: torch.Tensor, layers) -> dict:
    """θ̄ + Σ_i α_i (θ_i − θ̄) in float64, per layer (buffers: their group, -1 the mean), from the raw states."""
    k = len(states)
    alpha = alpha.double().reshape(k, -1)
    out = {}
    for key, g in layers.group.items():
        stack = torch.stack([s[key].double() for s in states])
        centre = stack.mean(dim=0)
        a = alpha[:, g] if g >= 0 else alpha.mean(dim=1)
        out[key] = centre + torch.einsum("k,k...->...", a, stack - centre)
    return out


def _weighted(states: list[dict], w: torch.Tensor, layers) -> dict:
    """Σ_i w_i θ_i in float64 (the soup its coefficients describe)."""
    w = w.double().reshape(len(states), -1)
    return {key: torch.einsum("k,k...->...", w[:, g] if g >= 0 else w.mean(dim=1),
                              torch.stack([s[key].double() for s in states])) for key, g in layers.group.items()}


def _close(a: dict, b: dict, tol: float) -> None:
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=tol, atol=tol), key


# ---- (1), (2) the start point -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mehl", "mehl+", "mehl+released"])
def test_no_new_model_means_no_block_and_the_old_soup_bit_for_bit(setup, method):
    paths, _, loader = setup
    old = make_soup(method, BNNet(), paths[:4], loader, **FAST)
    same = make_soup(method, BNNet(), paths[:4], loader, warm_start=old, **FAST)
    assert same.stats["outer_iterations"] == 0 and same.history == []
    assert same.stats["extends"]["new_models"] == 0 and same.stats["extends"]["models"] == 4
    assert same.state_dict.keys() == old.state_dict.keys()
    assert all(torch.equal(same.state_dict[k], old.state_dict[k]) for k in old.state_dict)
    assert torch.equal(same.coefficients, old.coefficients)


@pytest.mark.parametrize("method", ["mehl", "mehl+", "mehl+released"])
def test_the_start_point_with_new_models_is_the_old_soup(setup, method, monkeypatch):
    paths, states, loader = setup
    old = make_soup(method, BNNet(), paths[:4], loader, **FAST)
    layers = layer_map(BNNet(), method != "mehl")
    # zero inner steps: every block returns its start, so the result is the start point
    monkeypatch.setattr(hyperplane, "optimise", lambda space, w0, *a, **k: w0.detach().clone())
    start = make_soup(method, BNNet(), paths, loader, warm_start=old, **FAST)
    assert start.stats["outer_iterations"] == 1 and start.stats["extends"]["soup_residual"] < 1e-6
    assert all(torch.equal(start.state_dict[k], old.state_dict[k]) for k in old.state_dict)  # the soup itself
    w_old = old.coefficients.reshape(4, -1)
    assert torch.equal(start.coefficients.reshape(6, -1)[:4], w_old)
    assert not start.coefficients.reshape(6, -1)[4:].any()
    # the maths: θ(α_start) about the NEW centre θ̄ of all six is the old soup, and so is Σ w_i θ_i
    _close(_weighted(states, start.coefficients, layers), old.state_dict, 1e-5)
    if method != "mehl+released":
        alpha = start.params["alpha"]
        assert torch.equal(alpha[:4], w_old) and not alpha[4:].any()
        _close(_theta(states, alpha, layers), old.state_dict, 1e-5)
        _close(_theta(states[:4], old.params["alpha"], layers), old.state_dict, 1e-5)  # the old frame, for contrast


def test_after_the_extension_the_soup_is_still_its_own_coefficients(setup):
    paths, states, loader = setup
    layers = layer_map(BNNet(), True)
    old = make_soup("mehl+", BNNet(), paths[:4], loader, **FAST)
    new = make_soup("mehl+", BNNet(), paths, loader, warm_start=old, extend_passes=2, **FAST)
    _close(_theta(states, new.params["alpha"], layers), new.state_dict, 1e-5)
    _close(_weighted(states, new.coefficients, layers), new.state_dict, 1e-5)
    assert torch.allclose(new.coefficients.sum(dim=0), torch.ones(len(layers)), atol=1e-5)


# ---- (3) the blocks -----------------------------------------------------------------------------------------
def test_the_schedule_visits_every_new_model_per_pass_in_blocks_of_b():
    blocks = hyperplane._extension_schedule(5, 12, 3, passes=2, outer=None, seed=0)
    assert len(blocks) == 2 * 3 and all(len(b) == len(set(b)) == 3 for b in blocks)
    for p in range(2):
        new = sorted(i for b in blocks[3 * p:3 * p + 3] for i in b if i >= 5)
        assert new == list(range(5, 12))  # each pass: every new model once
    assert blocks == hyperplane._extension_schedule(5, 12, 3, passes=2, outer=None, seed=0)  # seeded
    assert blocks != hyperplane._extension_schedule(5, 12, 3, passes=2, outer=None, seed=1)
    longer = hyperplane._extension_schedule(5, 12, 3, passes=2, outer=9, seed=0)
    assert longer[:6] == blocks and longer[6:] == hyperplane._block_schedule(12, 3, 3, True, 0)
    assert hyperplane._extension_schedule(5, 12, 3, passes=2, outer=4, seed=0) == blocks[:4]
    # fewer old models than a block lacks: filled with other new models, still b
    assert all(len(set(b)) == 4 for b in hyperplane._extension_schedule(1, 6, 4, passes=1, outer=None, seed=0))
    assert hyperplane._extension_schedule(4, 4, 2, passes=3, outer=None, seed=0) == []


def test_new_models_first_and_unvisited_old_alphas_are_bit_exact(setup, tmp_path):
    paths, _, loader = setup
    old = make_soup("mehl+", BNNet(), paths[:4], loader, **FAST)
    options = {**FAST, "model_batch_size": 3}
    new = make_soup("mehl+", BNNet(), paths, loader, warm_start=old, run_dir=tmp_path / "run", **options)
    blocks = json.loads((tmp_path / "run" / "run.json").read_text())["blocks"]
    assert len(blocks) == 1 and {4, 5} <= set(blocks[0]) and len(blocks[0]) == 3  # 2 new + 1 old
    visited = set(blocks[0])
    alpha, w_old = new.params["alpha"], old.coefficients
    for i in range(4):
        if i in visited:
            assert not torch.equal(alpha[i], w_old[i]), i
        else:
            assert torch.equal(alpha[i], w_old[i]), i  # bit for bit: no block held it
    assert alpha[4:].abs().sum() > 0
    # more outer iterations than the new models' passes: the rest are ordinary passes over all K
    longer = make_soup("mehl+", BNNet(), paths, loader, warm_start=old, run_dir=tmp_path / "run2",
                       outer_iterations=3, **options)
    blocks2 = json.loads((tmp_path / "run2" / "run.json").read_text())["blocks"]
    assert blocks2[0] == blocks[0] and blocks2[1:] == hyperplane._block_schedule(6, 3, 2, True, FAST["seed"])
    assert longer.stats["extends"]["new_model_blocks"] == 1 and longer.stats["outer_iterations"] == 3


def test_the_run_dir_records_what_it_extends_and_resumes(setup, tmp_path, monkeypatch):
    paths, _, loader = setup
    old_dir = tmp_path / "old"
    old = make_soup("mehl+", BNNet(), paths[:3], loader, run_dir=old_dir, **FAST)
    options = dict(FAST, extend_passes=2)
    reference = make_soup("mehl+", BNNet(), paths, loader, warm_start=old_dir, **options)
    assert reference.stats["extends"]["from"] == str(old_dir.resolve()) and reference.stats["outer_iterations"] == 4

    save, count = RunDir.save, [0]

    def save_then_die(self, *args, **kwargs):  # killed right after the first block's checkpoint
        path = save(self, *args, **kwargs)
        count[0] += 1
        if count[0] == 1:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(RunDir, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_soup("mehl+", BNNet(), paths, loader, warm_start=old_dir, run_dir=tmp_path / "new", **options)
    manifest = json.loads((tmp_path / "new" / "run.json").read_text())
    assert manifest["extends"] == {k: reference.stats["extends"][k] for k in ("from", "method", "models", "result")}
    assert "warm_start" not in manifest["options"] and manifest["options"]["extend_passes"] == 2
    resumed = make_soup("mehl+", BNNet(), paths, loader, warm_start=old_dir, run_dir=tmp_path / "new", **options)
    assert resumed.stats["resumed_from_block"] == 1
    assert torch.equal(resumed.coefficients, reference.coefficients) and resumed.history[-4:] == reference.history[-4:]
    other = make_soup("mehl+", BNNet(), paths[:3], loader, **{**FAST, "seed": 7})
    with pytest.raises(ResumeError, match="extends"):  # a state grown from another result is not resumed
        make_soup("mehl+", BNNet(), paths, loader, warm_start=other, run_dir=tmp_path / "new", **options)


# ---- (4) it helps where it should -----------------------------------------------------------------------------
def test_a_good_new_model_lowers_the_heldout_loss(tmp_path):
    x, y = make_data(n=200, seed=3)
    loader = batches(x, y)
    _, weak = finetunes(BNNet, x, y, k=3, steps=2, seed=4)  # barely trained: the old soup is poor
    strong = finetunes(BNNet, x, y, k=1, steps=300, seed=4)[1][0]  # same pretrained start, well trained
    paths = save_files([*weak, strong], tmp_path)

    def loss(state):
        model = BNNet().eval()
        model.load_state_dict(state)
        with torch.no_grad():
            return float(sum(torch.nn.functional.cross_entropy(model(a), b, reduction="sum") for a, b in loader)) / len(y)

    options = dict(progress=False, model_batch_size=2, seed=0, epochs=5, lr=0.05)
    old = make_soup("mehl+", BNNet(), paths[:3], loader, **options)
    new = make_soup("mehl+", BNNet(), paths, loader, warm_start=old, **options)
    assert loss(new.state_dict) <= loss(old.state_dict) - 0.05  # can fail: the new model must be taken up
    assert float(new.coefficients[3].mean()) > 0.1


# ---- (5) refused inputs ---------------------------------------------------------------------------------------
def test_a_pool_without_the_old_models_first_is_refused(setup, tmp_path):
    paths, states, loader = setup
    old = make_soup("mehl+", BNNet(), paths[:3], loader, **FAST)
    swapped = save_files([states[0], states[4], states[2]], tmp_path)  # same shapes, so the same file size
    with pytest.raises(WarmStartError, match=r"model 1 of the pool \(.*m1\.safetensors\) is not model 1 .*content "
                                             r"digest .*same files in the same order"):
        make_soup("mehl+", BNNet(), [*swapped, paths[3]], loader, warm_start=old, **FAST)
    with pytest.raises(WarmStartError, match="model 0 of the pool"):
        make_soup("mehl+", BNNet(), [paths[1], paths[0], *paths[2:]], loader, warm_start=old, **FAST)
    with pytest.raises(WarmStartError, match="K_old=3 models, the pool has only K=2"):
        make_soup("mehl+", BNNet(), paths[:2], loader, warm_start=old, **FAST)
    with pytest.raises(WarmStartError, match="layer-wise over .* this run is model-wise"):
        make_soup("mehl", BNNet(), paths, loader, warm_start=old, **FAST)
    tampered = soupkit.SoupResult(old.name, {k: v.clone() for k, v in old.state_dict.items()}, old.coefficients,
                                  old.layer_names, dict(old.stats))
    tampered.state_dict["fc2.weight"] += 0.1  # a soup that is not its coefficients' combination of these models
    with pytest.raises(WarmStartError, match="not Σ_i w_i θ_i"):
        make_soup("mehl+", BNNet(), paths, loader, warm_start=tampered, **FAST)


def test_what_cannot_be_grown_is_named(setup, tmp_path):
    paths, _, loader = setup
    old = make_soup("mehl+", BNNet(), paths[:3], loader, **FAST)
    with pytest.raises(OptionError, match="warm_start grows a MEHL-Soup.*'hl\\+'.*model_batch_size=K"):
        make_soup("hl+", BNNet(), paths, loader, warm_start=old, **FAST)
    with pytest.raises(OptionError, match="'greedy' cannot start from one"):
        make_soup("greedy", BNNet(), paths, loader, warm_start=old, progress=False)
    greedy = make_soup("greedy", BNNet(), paths[:3], loader, progress=False)
    with pytest.raises(WarmStartError, match="not an HL/MEHL result"):
        make_soup("mehl+", BNNet(), paths, loader, warm_start=greedy, **FAST)
    with pytest.raises(WarmStartError, match="no such folder"):
        make_soup("mehl+", BNNet(), paths, loader, warm_start=tmp_path / "nothing", **FAST)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "state.safetensors").write_bytes(b"")
    with pytest.raises(WarmStartError, match="has not finished"):
        make_soup("mehl+", BNNet(), paths, loader, warm_start=tmp_path / "unfinished", **FAST)


# ---- (7) resident models --------------------------------------------------------------------------------------
def test_at_most_b_models_are_resident_during_the_extension(setup):
    paths, _, loader = setup
    old = make_soup("mehl+", BNNet(), paths[:3], loader, **FAST)
    new = make_soup("mehl+", BNNet(), CheckpointPool(paths), loader, warm_start=old, extend_passes=2,
                    outer_iterations=5, **FAST)
    assert new.stats["outer_iterations"] == 5 and new.stats["max_resident_models"] <= FAST["model_batch_size"]


# ---- (6) the command line -------------------------------------------------------------------------------------
@pytest.fixture
def tiny_arch(monkeypatch, tmp_path):
    """``--arch``'s builders replaced by BNNet and in-memory splits; six fine-tunes written as .pt files."""
    return install_tiny_arch(monkeypatch, tmp_path, k=6)


def test_the_command_line_extends_a_run_dir(tiny_arch, capsys):
    from soupkit.cli import main

    d = tiny_arch
    common = ["--arch", "tiny", "--data", "cifar10", "--data-root", "x", "--workers", "0", "--batch-size", "20",
              "--no-progress", "--option", "inner_iterations=3", "--option", "model_batch_size=2"]
    old_pool = [str(d / f"model_{i}.pt") for i in range(4)]
    assert main(["mehl+", *common, "--pool", *old_pool, "--option", f"run_dir={d / 'run'}", "--out",
                 str(d / "old")]) == 0
    assert main(["mehl+", *common, "--pool", str(d / "model_*.pt"), "--extend", str(d / "run"), "--option",
                 f"run_dir={d / 'run2'}", "--out", str(d / "new")]) == 0
    new = soupkit.SoupResult.load(d / "new")
    assert new.stats["extends"]["from"] == str((d / "run").resolve()) and new.stats["extends"]["new_models"] == 2
    assert json.loads((d / "run2" / "run.json").read_text())["extends"]["models"] == 4
    assert 0.0 <= new.stats["test_accuracy"] <= 1.0 and new.coefficients.shape[0] == 6
    # the --out folder of an earlier run works as well
    assert main(["mehl+", *common, "--pool", str(d / "model_*.pt"), "--extend", str(d / "old"), "--no-eval",
                 "--out", str(d / "new2")]) == 0
    capsys.readouterr()
    for argv, message in [(["hl+", "--extend", str(d / "run")], "--extend grows a MEHL-Soup(+) result"),
                          (["mehl+", "--extend", str(d / "nope")], "--extend " + str(d / "nope") + ": no such folder"),
                          (["mehl+", "--option", "warm_start=x"], "use --extend")]:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, *common, "--pool", *old_pool, "--out", str(d / "x")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
