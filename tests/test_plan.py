"""soupkit.experiments.plan: the formulas' shape in K, a hand-computed case, the budget, the command line."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import soupkit  # noqa: F401  (first: pins the CPU numerics)
import torch
from torch import nn

from soupkit.experiments import plan
from soupkit.errors import PlanError, SoupkitError

ACTS = plan.ActivationModel(train_fixed=1000.0, train_per_sample=100.0, eval_fixed=10.0, eval_per_sample=5.0)


class Net(nn.Module):
    """10·20 + 20 + 20·3 + 3 = 283 parameters, 4 tensors; the largest has 200 elements."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 20)
        self.fc2 = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_model_size_counts_elements_tensors_classes():
    size = plan.model_size(Net())
    assert (size.floating, size.largest, size.tensors, size.num_classes) == (283, 200, 4, 3)
    assert size.model_bytes(torch.float32) == 283 * 4 and size.model_bytes(torch.bfloat16) == 283 * 2


def test_hand_computed_mehl_plus_and_learned_plus():
    m = 283 * 4  # one model, float32
    a = 1000 + 100 * 16  # A(16)
    p = plan.plan_memory("mehl+", Net(), 12, b=3, batch=16, activations=ACTS, device="cpu")
    # centre + soup + 3 directions + activations + the runtime's constant (the centre pass 2M + R is smaller)
    assert p.peak_bytes == 2 * m + 3 * m + a + plan.CPU_RUNTIME_BYTES
    assert p.b == 3 and p.terms["M"] == m and p.terms["A"] == a
    q = plan.plan_memory("learned+", Net(), 12, batch=16, activations=ACTS, device="cpu")
    assert q.peak_bytes == 13 * m + 12 * 4 * plan.CPU_GRAPH_BYTES_PER_PAIR + a + plan.CPU_RUNTIME_BYTES
    # CUDA: the HL/MEHL centre lives in host memory, no runtime constant, no host graph objects
    c = plan.plan_memory("mehl+", Net(), 12, b=3, batch=16, activations=ACTS, device="cuda")
    assert c.peak_bytes == m + 3 * m + a
    assert plan.plan_memory("learned+", Net(), 12, batch=16, activations=ACTS, device="cuda").peak_bytes \
        == 13 * m + a


def test_baselines_hand_computed():
    m, r, f = 283 * 4, 0, 10 + 5 * 16  # files are memory-mapped: a read adds nothing beside the model
    kw = dict(batch=16, activations=ACTS, heldout=50)
    z, h = 2 * 50 * 3 * 4, plan.CPU_HEAP_BYTES  # H: the host heap the baselines grow on CPU
    assert plan.plan_memory("uniform", Net(), 8, **kw).peak_bytes == 2 * m + r + h
    assert plan.plan_memory("greedy", Net(), 8, **kw).peak_bytes == max(2 * m + r, 3 * m + f) + z + h
    assert plan.plan_memory("best", Net(), 8, **kw).peak_bytes == max(m + r, m + f, 2 * m) + z + h
    assert plan.plan_memory("ensemble", Net(), 8, **kw).peak_bytes == max(m + r, m + f) + z + h
    assert plan.plan_memory("uniform", Net(), 8, checkpoint_format="copy", **kw).peak_bytes == 3 * m + h
    # host memory: no H on CUDA, and a given one replaces the default
    assert plan.plan_memory("uniform", Net(), 8, device="cuda", **kw).peak_bytes == 2 * m
    assert plan.plan_memory("uniform", Net(), 8, heap_bytes=7, **kw).peak_bytes == 2 * m + 7
    assert "H=" in plan.format_table([plan.plan_memory("greedy", Net(), 8, **kw)])


def test_b_and_prefetch_follow_the_registry_families():
    """b and the prefetched second block come from ``METHODS[name].family``: every "mehl" method (mehl+released too)
    is blockwise, HL and Learned-Soup hold all K, the rest one model."""
    from soupkit.methods.registry import METHODS

    kw = dict(batch=8, activations=ACTS)
    for name in ("mehl", "mehl+", "mehl+released"):
        assert METHODS[name].family == "mehl"
        one, two = (plan.plan_memory(name, Net(), 12, b=3, prefetch=p, **kw) for p in (False, True))
        assert one.b == 3 and "2b·" in two.formula and "2b·" not in one.formula
        assert two.peak_bytes > one.peak_bytes
    for name in ("hl", "hl+", "learned", "learned+"):
        p = plan.plan_memory(name, Net(), 12, b=3, prefetch=True, **kw)
        assert p.b == 12 and "2b·" not in p.formula
    assert plan.plan_memory("greedy", Net(), 12, b=3, **kw).b == 1
    assert plan.plan_memory("mehl+released", Net(), 10, **kw).b == math.ceil(10 / 4)


def test_mehl_flat_in_k_learned_grows():
    size = plan.ModelSize(floating=10**6, largest=10**5, tensors=10, num_classes=10)
    ks = [4, 8, 16, 32, 72]
    mehl = [plan.plan_memory("mehl+", size, k, b=4, batch=32, activations=ACTS).peak_bytes for k in ks]
    learned = [plan.plan_memory("learned+", size, k, batch=32, activations=ACTS).peak_bytes for k in ks]
    hl = [plan.plan_memory("hl+", size, k, batch=32, activations=ACTS).peak_bytes for k in ks]
    assert len(set(mehl)) == 1  # b fixed: flat in K
    assert all(x < y for x, y in zip(learned, learned[1:])) and all(x < y for x, y in zip(hl, hl[1:]))
    assert learned[-1] - learned[0] >= (72 - 4) * size.model_bytes()  # at least one model per model
    assert learned[-1] / mehl[-1] > 8
    # monotone in b and in the batch
    by_b = [plan.plan_memory("mehl+", size, 32, b=b, batch=32, activations=ACTS).peak_bytes for b in (1, 2, 8, 32)]
    assert by_b == sorted(by_b) and len(set(by_b)) == 4
    by_batch = [plan.plan_memory("mehl+", size, 32, b=4, batch=n, activations=ACTS).peak_bytes for n in (1, 64, 256)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == 3
    # default b = ceil(K/4), b > K clamped to K
    assert plan.plan_memory("mehl", size, 10, activations=ACTS).b == math.ceil(10 / 4)
    assert plan.plan_memory("mehl", size, 3, b=8, activations=ACTS).b == 3


def test_fits_flips_at_the_budget():
    p = plan.plan_memory("mehl+", Net(), 8, b=2, batch=4, activations=ACTS)
    assert plan.plan_memory("mehl+", Net(), 8, b=2, batch=4, activations=ACTS, budget_bytes=p.peak_bytes).fits is True
    assert plan.plan_memory("mehl+", Net(), 8, b=2, batch=4, activations=ACTS,
                            budget_bytes=p.peak_bytes - 1).fits is False
    assert p.fits is None
    assert plan.device_budget("cpu", 123) == (123, "given cap")


def test_bad_arguments_raise_soupkit_errors():
    for kwargs in ({"k": 0}, {"k": 4, "b": 0}, {"k": 4, "batch": 0}):
        with pytest.raises(SoupkitError):
            plan.plan_memory("mehl+", Net(), activations=ACTS, **{"b": None, "batch": 8, **kwargs})
    with pytest.raises(PlanError, match="unknown soup method"):
        plan.plan_memory("souper", Net(), 4, activations=ACTS)
    with pytest.raises(PlanError, match="input_shape"):
        plan.plan_memory("mehl+", Net(), 4)


def test_measured_activations_grow_with_the_batch():
    acts = plan.measure_activations(Net(), (10,), batches=(2, 8))
    assert acts.train_per_sample > 0 and acts.train(64) > acts.train(8) > 0
    # a forward + backward of fc1 at batch 8 holds at least its input and output activations
    assert acts.train(8) >= 8 * (10 + 20) * 4
    assert "measured" in acts.source


def test_live_bytes_ignores_views_and_counts_frees():
    meter = plan._LiveBytes()
    with meter:
        x = torch.ones(1000)
        y = x[:10]  # a view: no new storage
        assert meter.current == 4000
        del x, y
        assert meter.current == 0
    assert meter.peak == 4000


def test_main_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plan, "_model_and_shape", lambda args: (Net(), (10,), 8, 0))
    assert plan.main(["--zoo", str(tmp_path), "--b", "2", "--batch", "16", "--budget-gb", "1"]) == 0
    out = capsys.readouterr().out
    for method in ("best", "learned+", "hl+", "mehl+", "mehl+released", "ensemble"):
        assert f"\n{method} " in out
    assert "yes" in out and "K = 8" in out and "(K + 1)M" in out


def test_main_rejects_bad_arguments_with_one_sentence(tmp_path, capsys):
    assert plan.main(["--zoo", str(tmp_path), "--methods", "souper"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("soupkit.experiments.plan: unknown soup method 'souper'") and "\n" not in err
    assert "Traceback" not in err
    assert plan.main(["--zoo", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert plan.main(["--arch", "ViT-B-32-quickgelu"]) == 2
    assert "--arch needs --k" in capsys.readouterr().err
    assert plan.main(["--zoo", str(tmp_path), "--k", "0"]) == 2
    assert "--k must be >= 1" in capsys.readouterr().err
    assert plan.main(["--zoo", str(tmp_path), "--dtype", "int8"]) == 2
    assert "not a floating torch dtype" in capsys.readouterr().err
    assert plan.main(["--zoo", str(tmp_path), "--direction-dtype", "nope"]) == 2
    assert "--direction-dtype='nope' is not a torch dtype" in capsys.readouterr().err


def test_main_argparse_errors_are_one_line(capsys):
    assert plan.main(["--k", "4"]) == 2  # neither --zoo nor --arch
    err = capsys.readouterr().err.strip()
    assert err.startswith("soupkit.experiments.plan: ") and "\n" not in err



def test_the_soupkit_command_runs_the_planner(tmp_path, capsys) -> None:
    """`python -m soupkit plan ...` is the planner: same exit status and sentence as `python -m soupkit.experiments.plan`."""
    from soupkit.cli import main as cli_main

    assert cli_main(["plan", "--zoo", str(tmp_path / "missing")]) == 2
    via_cli = capsys.readouterr().err
    assert plan.main(["--zoo", str(tmp_path / "missing")]) == 2
    assert via_cli and via_cli == capsys.readouterr().err


def test_main_accepts_the_short_dtype_names(tmp_path, capsys, monkeypatch):
    """One dtype parser (soupkit.config.parse_dtype) for the planner and the options: bf16, fp16, fp32, float16..."""
    monkeypatch.setattr(plan, "_model_and_shape", lambda args: (Net(), (10,), 8, 0))
    for name, shown in (("fp32", "float32"), ("bf16", "bfloat16"), ("float16", "float16"), ("HALF", "float16")):
        assert plan.main(["--zoo", str(tmp_path), "--dtype", name, "--direction-dtype", "bf16"]) == 0
        assert f"({shown})" in capsys.readouterr().out


# ---- the zoo interface and a zoo's runs ----------------------------------------------------------------------------
class Tower(nn.Module):
    """Stands for an open_clip image tower: ``image_size`` and a first convolution ``conv1``."""

    def __init__(self, channels: int = 2, size: int = 6) -> None:
        super().__init__()
        self.image_size = size
        self.conv1 = nn.Conv2d(channels, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv1(x)).flatten(1)


class ImageNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = Tower()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(x))


def _tiny_zoo(shape=None):
    from soupkit.zoo.base import BaseZoo

    class TinyZoo(BaseZoo):
        records = tuple({"index": i, "heldout_acc": 0.5, "test_acc": 0.5} for i in range(6))
        paths = property(lambda self: [])
        make_model = staticmethod(ImageNet)
        tensors = loaders = describe = None  # not used by the planner

    if shape is not None:
        TinyZoo.input_shape = lambda self, model=None: shape
    return TinyZoo()


def test_the_zoo_gives_its_input_shape():
    from soupkit.zoo.base import image_input_shape

    assert image_input_shape(ImageNet()) == (2, 6, 6)  # the tower's channels, not open_clip's 3
    assert image_input_shape(Net()) == (3, 224, 224)  # no image tower: CLIP's
    assert _tiny_zoo().input_shape() == (2, 6, 6)  # BaseZoo's default reads the zoo's model
    # the embedded zoo's own: its config, not the (padded) tower of its ResNet
    from soupkit.zoo.build import Zoo
    from soupkit.zoo.config import ZooConfig
    from soupkit.zoo.embedded_models import ResNetConfig

    zoo = Zoo(Path("."), ZooConfig(model=ResNetConfig()), (), {})
    cfg = zoo.config.model
    assert zoo.input_shape() == (cfg.in_channels, cfg.image_size, cfg.image_size) != image_input_shape(zoo.make_model())


def test_main_plans_a_zoo_with_the_zoos_input_shape(tmp_path, capsys, monkeypatch):
    import soupkit.zoo.sources as sources

    seen = []
    monkeypatch.setattr(sources, "open_zoo", lambda path: _tiny_zoo())
    real = plan.measure_activations
    monkeypatch.setattr(plan, "measure_activations", lambda model, shape, **kw: seen.append(shape) or real(model, shape, **kw))
    assert plan.main(["--zoo", str(tmp_path), "--batch", "4", "--methods", "mehl+"]) == 0
    assert seen == [(2, 6, 6)] and "K = 6" in capsys.readouterr().out


def test_fit_verdict_allows_the_planners_accuracy():
    assert plan.fit_verdict(100, None) == "no cap"
    assert plan.fit_verdict(100, 115) == "fits" and plan.fit_verdict(100, 114) == "borderline"
    assert plan.fit_verdict(100, 86) == "borderline" and plan.fit_verdict(100, 84) == "does not fit"
    assert plan.fit_verdict(100, 100, tolerance=0.0) == "fits" and plan.fit_verdict(100, 99, tolerance=0.0) == "does not fit"


def test_plan_table_cites_the_plan_for_each_run():
    zoo = _tiny_zoo((2, 6, 6))
    size, mb = plan.model_size(ImageNet()), 2**20
    mehl = plan.plan_memory("mehl+", size, 6, b=3, batch=16, activations=ACTS)
    greedy = plan.plan_memory("greedy", size, 6, batch=16, activations=ACTS, heldout=40)
    cap = mehl.peak_bytes / mb  # MEHL-Soup+ at its cap: borderline; the learned soup's (K + 1) models: above it
    records = [
        {"method": "mehl+", "status": "ok", "peak_memory_bytes": 3 * mb, "memory_cap_mb": cap, "num_models": 6,
         "batch_size": 16, "options": {"model_batch_size": 3}},
        {"method": "learned+", "status": "did not fit", "peak_memory_bytes": None, "memory_cap_mb": cap / 10,
         "num_models": 6, "batch_size": 16, "heldout_size": 50, "options": {}},
        {"method": "greedy", "status": "ok", "peak_memory_bytes": mb, "memory_cap_mb": None, "num_models": 6,
         "batch_size": 16, "heldout_size": 50, "select_fraction": 0.2, "options": {}},
        {"method": "mine", "status": "ok", "peak_memory_bytes": mb, "memory_cap_mb": 1.0, "num_models": 6},
    ]
    t = plan.plan_table(zoo, records, activations=ACTS)
    assert list(t["method"]) == ["mehl+", "learned+", "greedy", "mine"]
    assert list(t["plan"]) == ["borderline", "does not fit", "no cap", "no formula"]
    # planned with the options the run had: b = 3 of K = 6 (not ceil(K/4)); held-out 50 less the select part
    assert t["predicted peak (MB)"].iloc[0] == pytest.approx(cap)
    assert t["predicted peak (MB)"].iloc[2] == pytest.approx(greedy.peak_mb)
    assert t["measured peak (MB)"].iloc[0] == 3.0 and pd_isna(t["measured peak (MB)"].iloc[1])
    assert list(t["run"]) == ["ok", "did not fit", "ok", "ok"] and pd_isna(t["predicted peak (MB)"].iloc[3])
    # with a generous cap every planned run fits
    roomy = [{**r, "memory_cap_mb": 10_000.0} for r in records[:3]]
    assert list(plan.plan_table(zoo, roomy, activations=ACTS)["plan"]) == ["fits"] * 3


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_plan_check_compares_the_median_and_keeps_every_measurement():
    from conftest import load_benchmark

    plan_check = load_benchmark("plan_check")
    row = plan_check.summarise(10.0, [9.0, 12.5, 10.0], tolerance=0.15)
    assert row["measured_mb"] == 10.0 and row["ratio"] == 1.0 and row["within"] is True
    assert (row["measured_min_mb"], row["measured_max_mb"], row["repeats"]) == (9.0, 12.5, 3)
    assert row["measurements_mb"] == "9.0000;12.5000;10.0000"
    # one outlier does not move the median; two do
    assert plan_check.summarise(10.0, [10.0, 30.0, 10.1], 0.15)["within"] is True
    assert plan_check.summarise(10.0, [10.0, 30.0, 30.0], 0.15)["within"] is False
    with pytest.raises(ValueError):
        plan_check.summarise(10.0, [], 0.15)
    assert set(row) <= set(plan_check.COLUMNS)
