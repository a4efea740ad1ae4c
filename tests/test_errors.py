"""Bad inputs get soupkit's own error, naming the file (and key), before any long computation, and earlier
outputs stay as they were."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import soupkit
from soupkit import CheckpointPool, make_soup
from soupkit.pool.basin import basin_report, check_shared_basin
from soupkit.errors import CheckpointError, DataError, DivergenceError, SharedBasinWarning, SoupkitError
from conftest import BNNet, finetunes, make_data, save_files

FAST = dict(progress=False, inner_iterations=4)


class CountingNet(BNNet):
    """BNNet that counts its forward passes: the checks may run one, training runs many."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


def _files(states, tmp_path, fmt="safetensors"):
    return save_files(states, tmp_path, fmt)


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---- files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_truncated_and_garbage_files_name_the_file(bn_setup, tmp_path, fmt):
    _, states, _ = bn_setup
    paths = _files(states[:3], tmp_path, fmt)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"m1\.{fmt}: cannot be read"):
        CheckpointPool(paths)
    paths[1].write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=rf"m1\.{fmt}"):
        CheckpointPool(paths)


def test_missing_file_and_directory(bn_setup, tmp_path):
    base, states, loader = bn_setup
    paths = _files(states[:2], tmp_path)
    with pytest.raises(CheckpointError, match=r"gone\.safetensors: file not found"):
        make_soup("mehl", base, [*paths, tmp_path / "gone.safetensors"], loader, **FAST)
    (tmp_path / "adir.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"adir\.pt: not a file"):
        soupkit.load_state_dict(tmp_path / "adir.pt")


def test_different_keys_in_pt_name_file_and_key(bn_setup, tmp_path):
    _, states, _ = bn_setup
    bad = {k: v for k, v in states[2].items() if k != "bn.running_var"}
    with pytest.raises(CheckpointError, match=r"m1\.pt: missing key 'bn\.running_var'"):
        CheckpointPool(_files([states[0], bad], tmp_path, "pt"))


def test_dtypes_differ_unless_cast_and_the_cast_pool_soups(bn_setup, tmp_path):
    base, states, loader = bn_setup
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in states[1].items()}
    paths = _files([states[0], half, states[2]], tmp_path)
    with pytest.raises(CheckpointError, match=r"m1\.safetensors: key '.*' has dtype torch\.bfloat16.*cast_dtype"):
        CheckpointPool(paths)
    pool = CheckpointPool(paths, cast_dtype=torch.float32)
    r = make_soup("mehl+", base, pool, loader, model_batch_size=2, **FAST)
    assert all(torch.isfinite(v).all() for v in r.state_dict.values() if v.is_floating_point())


def test_untrusted_pt_runs_no_code_and_holds_only_tensors(tmp_path, bn_setup):
    _, states, _ = bn_setup
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"fc1.weight": states[0]["fc1.weight"], "x": Exploit()}, tmp_path / "evil.pt")
    torch.save(BNNet(), tmp_path / "module.pt")  # a whole pickled module: classes are not loaded
    torch.save({**states[0], "epoch": 3}, tmp_path / "extra.pt")
    (tmp_path / "fake.safetensors").write_bytes((tmp_path / "evil.pt").read_bytes())
    for name, match in [("evil.pt", "evil.pt"), ("module.pt", "module.pt"), ("fake.safetensors", "fake"),
                        ("extra.pt", r"key 'epoch' is a int")]:
        with pytest.raises(CheckpointError, match=match):
            CheckpointPool([tmp_path / name])
    assert not marker.exists()


# ---- values ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mehl+", "hl", "learned", "greedy", "best", "uniform", "ensemble"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_stop_every_method_before_it_starts(bn_setup, tmp_path, name, bad):
    _, states, loader = bn_setup
    broken = {k: v.clone() for k, v in states[3].items()}
    broken["fc2.weight"][1, 2] = bad
    paths = _files([*states[:3], broken], tmp_path)
    CountingNet.calls = 0
    with pytest.raises(CheckpointError, match=r"m3\.safetensors: key 'fc2\.weight' holds"):
        make_soup(name, CountingNet(), paths, loader, model_batch_size=2, **FAST)
    assert CountingNet.calls <= 1  # at most the held-out check's one forward pass ran


def test_value_check_is_per_dtype_and_can_be_disabled(bn_setup):
    _, states, _ = bn_setup
    big = {k: v * 1e6 if k == "fc1.weight" else v for k, v in states[0].items()}
    pool = CheckpointPool([big])
    pool.load(0)  # finite in float32
    with pytest.raises(CheckpointError, match="Inf values .* torch.float16"):
        pool.load(0, dtype=torch.float16)  # but not once cast to float16
    nan = {k: v * float("nan") for k, v in states[0].items()}
    assert not torch.isfinite(CheckpointPool([nan], check_finite=False).load(0)["fc1.weight"]).any()


def test_value_check_reads_each_model_once_in_the_centre_pass(bn_setup, tmp_path):
    base, states, loader = bn_setup
    pool = CheckpointPool(_files(states, tmp_path))
    centre = pool.center()
    loads = pool.loads
    assert sorted(pool.sq_norms) == list(range(len(states)))
    check_shared_basin(pool, centre)
    pool.check_values()
    assert pool.loads == loads  # norms, basin and value checks all came from the one pass


# ---- K and b --------------------------------------------------------------------------------------------
def test_empty_pool():
    with pytest.raises(CheckpointError, match="K = 0"):
        make_soup("mehl+", BNNet(), [], [])


@pytest.mark.parametrize("name", ["mehl+", "hl", "learned+"])
def test_single_file_pool_returns_the_model(bn_setup, tmp_path, name):
    base, states, loader = bn_setup
    r = make_soup(name, base, _files(states[:1], tmp_path), loader, **FAST)
    assert all(torch.allclose(r.state_dict[k].to(v.dtype), v, atol=1e-6) for k, v in states[0].items())


def test_b_larger_than_k_is_clamped_with_a_warning(bn_setup):
    base, states, loader = bn_setup
    with pytest.warns(UserWarning, match=r"model_batch_size=9 > K=5: using b = K"):
        mehl = make_soup("mehl+", base, states, loader, model_batch_size=9, **FAST)
    hl = make_soup("hl+", base, states, loader, **FAST)
    assert mehl.stats["model_batch_size"] == 5 and torch.allclose(mehl.coefficients, hl.coefficients)


# ---- held-out data --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mehl", "learned", "greedy", "best"])
def test_empty_heldout_loader(bn_setup, name):
    base, states, _ = bn_setup
    with pytest.raises(DataError, match="held-out loader is empty"):
        make_soup(name, base, states, [], **FAST)
    assert make_soup("uniform", base, states, [], progress=False).state_dict is not None  # needs no data


@pytest.mark.parametrize("name", ["mehl+", "learned", "best"])
def test_labels_outside_the_head(bn_setup, name):
    base, states, loader = bn_setup
    shifted = [(x, y + 3) for x, y in loader]  # labels 3..5 for a 3-class head
    CountingNet.calls = 0
    with pytest.raises(DataError, match=r"labels must lie in \[0, 3\).*head has 3 outputs.*from 3 to 5"):
        make_soup(name, CountingNet(), states, shifted, **FAST)
    assert CountingNet.calls == 1


def test_a_later_bad_batch_is_caught_by_the_loss(bn_setup):
    base, states, loader = bn_setup
    late = [*loader[:-1], (loader[-1][0], loader[-1][1] - 1)]  # a -1 label, in the last batch only
    with pytest.raises(DataError, match="labels must lie in"):
        make_soup("mehl", base, states, late, **FAST)


def test_batches_must_be_pairs_the_model_can_run(bn_setup):
    base, states, loader = bn_setup
    with pytest.raises(DataError, match=r"\(inputs, labels\)"):
        make_soup("hl", base, states, [x for x, _ in loader], **FAST)
    with pytest.raises(DataError, match=r"cannot run on the held-out loader's first batch \(inputs \[40, 5\]"):
        make_soup("hl", base, states, [(x[:, :5], y) for x, y in loader], **FAST)
    with pytest.raises(DataError, match="select_loader"):
        make_soup("hl", base, states, loader, select_loader=[(x, y + 7) for x, y in loader], **FAST)


# ---- shared basin ---------------------------------------------------------------------------------------
def test_basin_report_on_hand_computed_norms():
    # two models (1, 0) and (0, 1): ‖θ_i‖² = 1, θ̄ = (.5, .5), ‖θ̄‖² = .5 → (4 · .5 − 2) / (1 · 2) = 0
    assert basin_report([{"w": 1.0}, {"w": 1.0}], {"w": 0.5}, {"w": 2}).mean_cosine == 0.0
    # opposite models: θ̄ = 0 → −1; sizes weight the tensors
    r = basin_report([{"a": 1.0, "b": 1.0}] * 2, {"a": 1.0, "b": 0.0}, {"a": 3, "b": 1})
    assert r.per_key == {"a": 1.0, "b": -1.0} and r.mean_cosine == pytest.approx(0.5) and r.shared
    assert basin_report([{"w": 1.0}], {"w": 1.0}, {"w": 1}).mean_cosine is None


def test_models_from_different_inits_warn_and_fine_tunes_do_not(bn_setup):
    base, states, loader = bn_setup
    x, y = make_data()
    strangers = [finetunes(BNNet, x, y, k=1, seed=100 + i)[1][0] for i in range(4)]
    with pytest.warns(SharedBasinWarning, match="do not look like fine-tunes"):
        r = make_soup("mehl", base, strangers, loader, model_batch_size=2, **FAST)
    assert r.stats["basin_mean_cosine"] < 0.5
    with pytest.warns(SharedBasinWarning):
        make_soup("learned", base, strangers, loader, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SharedBasinWarning)
        make_soup("mehl", base, strangers, loader, model_batch_size=2, check_basin=False, **FAST)
        ok = make_soup("mehl", base, states, loader, model_batch_size=2, **FAST)
    assert ok.stats["basin_mean_cosine"] > 0.9


# ---- divergence and outputs -----------------------------------------------------------------------------
def test_divergence_names_the_block_and_writes_nothing(bn_setup, tmp_path):
    base, states, loader = bn_setup
    r = make_soup("hl", base, states, loader, **FAST)
    r.save(tmp_path / "out")
    before = _snapshot(tmp_path / "out")

    class TurnsNaN(list):  # fine for the checks and the first block, NaN after
        served = 0

        def __iter__(self):
            for x, y in super().__iter__():
                type(self).served += 1
                yield (x * float("nan") if self.served > 12 else x), y

    with pytest.raises(DivergenceError, match=r"outer iteration 2/3: non-finite loss"):
        make_soup("mehl", base, states, TurnsNaN(loader), model_batch_size=2, **FAST)
    nan_soup = soupkit.SoupResult("x", {"w": torch.tensor([float("nan")])}, torch.ones(1))
    with pytest.raises(DivergenceError, match="NaN in 'w'; nothing was written"):
        nan_soup.save(tmp_path / "out")
    assert _snapshot(tmp_path / "out") == before


def test_errors_leave_earlier_outputs_intact(bn_setup, tmp_path):
    base, states, loader = bn_setup
    out = make_soup("mehl", base, states, loader, model_batch_size=2, **FAST).save(tmp_path / "out")
    before = _snapshot(out)
    with pytest.raises(SoupkitError):
        make_soup("mehl", base, [*states[:2], {"fc1.weight": torch.zeros(1)}], loader, **FAST)
    assert _snapshot(out) == before


def test_an_interrupted_save_is_detected_not_mixed(bn_setup, tmp_path, monkeypatch):
    base, states, loader = bn_setup
    make_soup("hl", base, states, loader, **FAST).save(tmp_path / "out")
    newer = make_soup("uniform", base, states, loader, progress=False)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(soupkit.methods.result, "atomic_write_json", killed)  # dies before result.json is replaced
    with pytest.raises(KeyboardInterrupt):
        newer.save(tmp_path / "out")
    with pytest.raises(CheckpointError, match="another save than result.json"):
        soupkit.SoupResult.load(tmp_path / "out")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files


def test_soupkit_errors_are_also_builtin_errors():
    assert issubclass(CheckpointError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(DivergenceError, RuntimeError) and soupkit.DivergenceError is DivergenceError
    assert soupkit.CheckpointError is CheckpointError and soupkit.check_shared_basin is check_shared_basin
    with pytest.raises(SoupkitError):
        make_soup("hl", nn.Linear(2, 2), [{"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}], [], **FAST)


def test_every_exception_soupkit_defines_is_a_soupkit_error_defined_in_errors() -> None:
    """One hierarchy: `except soupkit.SoupkitError` catches every error soupkit raises on purpose, and each
    class has one home (soupkit/errors.py), so no module defines a second DataError."""
    import importlib
    import inspect
    import pkgutil

    import soupkit.errors

    homes = {}
    for info in pkgutil.walk_packages(soupkit.__path__, "soupkit."):
        if info.name == "soupkit.__main__":
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__.startswith("soupkit"):
                homes.setdefault(obj, set()).add(obj.__module__)
    public = {cls for cls in homes if not cls.__name__.startswith("_")}
    assert {cls.__module__ for cls in public} == {"soupkit.errors"}, \
        sorted(f"{c.__module__}.{c.__name__}" for c in public if c.__module__ != "soupkit.errors")
    errors = {cls for cls in public if not issubclass(cls, Warning)}
    assert all(issubclass(cls, soupkit.errors.SoupkitError) for cls in errors), \
        sorted(c.__name__ for c in errors if not issubclass(c, soupkit.errors.SoupkitError))
    names = [c.__name__ for c in public]
    assert len(names) == len(set(names))
