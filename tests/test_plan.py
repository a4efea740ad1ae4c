"""soupkit.experiments.plan: the formulas' shape in K, a hand-computed case, the budget, the command line."""
from __future__ import annotations

import math

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
    z = 2 * 50 * 3 * 4
    assert plan.plan_memory("uniform", Net(), 8, **kw).peak_bytes == 2 * m + r
    assert plan.plan_memory("greedy", Net(), 8, **kw).peak_bytes == max(2 * m + r, 3 * m + f) + z
    assert plan.plan_memory("best", Net(), 8, **kw).peak_bytes == max(m + r, m + f, 2 * m) + z
    assert plan.plan_memory("uniform", Net(), 8, checkpoint_format="copy", **kw).peak_bytes == 3 * m


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
