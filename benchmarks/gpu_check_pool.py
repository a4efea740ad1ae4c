"""GPU check, part 1: does every soup method give on the device what it gives on CPU? (and the tiny pool for part 4)

The tiny pool: an MLP with BatchNorm (a floating and an integer buffer, as real models have) on a 4-class
teacher task; a "pretrained" model and K fine-tunes of it with different learning rates and data orders,
written as safetensors and read through ``soupkit.CheckpointPool`` (so the file-to-device path is exercised).
``run_method`` makes one soup with ``make_soup`` and scores it on a test split; ``equality`` runs every method
of ``soupkit.METHODS`` once on the reference device and once on the device and compares the results.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import soupkit  # noqa: F401  (before torch: it pins the CPU numerics)
import torch
from torch import Tensor, nn

from soupkit import CheckpointPool, make_soup
from soupkit.methods.registry import METHODS
from soupkit.methods.result import SoupResult, evaluate

Batches = list[tuple[Tensor, Tensor]]
DIM, CLASSES, K = 10, 4, 6

# Tolerances of the device-vs-CPU comparison. Why not bitwise: CUDA's float32 kernels sum in another order than
# the CPU's (blocked GEMMs, tree reductions in BatchNorm and cross-entropy), so each op differs by a few ulps
# (~1e-7 relative); 20 AdamW steps carry that into the coefficients at about lr * 1e-5 at most, far below
# 1e-4. The accuracy may flip on a test example whose two top logits are within that noise: one is allowed.
# Between two runs on the same device nothing differs, so the tolerance there is 0 (exact).
COEF_TOL = 1e-4
ACC_TOL_EXAMPLES = 1


class TinyNet(nn.Module):
    """``x [B, 10] -> logits [B, 4]``: Linear, BatchNorm, GELU, Linear, GELU, Linear."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, width)
        self.norm = nn.BatchNorm1d(width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.gelu(self.norm(self.inp(x)))
        return self.out(nn.functional.gelu(self.mid(h)))


def _split(n: int, gen: torch.Generator, teacher: Tensor) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, DIM, generator=gen)
    return x, (x @ teacher).argmax(dim=1)


def _batches(x: Tensor, y: Tensor, size: int) -> Batches:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


class TinyPool:
    """The base model, K fine-tunes as safetensors in ``directory``, held-out and test batches.

    Attributes:
        paths: the K checkpoint files; pretrained: the base model's file (θ_0, for Model Stock and task
        arithmetic). heldout: batches ``(x [40, 10], y [40])`` the soups learn on (160
        examples); test: batches of the 400 examples the soups are scored on (1 example = 0.25 points).
    """

    def __init__(self, directory: Path, k: int = K, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        teacher = torch.randn(DIM, CLASSES, generator=gen)
        x_train, y_train = _split(512, gen, teacher)
        self.heldout = _batches(*_split(160, gen, teacher), 40)
        self.test = _batches(*_split(400, gen, teacher), 100)
        self.test_examples = 400
        torch.manual_seed(seed)
        base = TinyNet()
        self._train(base, x_train, y_train, lr=0.05, steps=30, gen=gen)  # the "pretrained" model
        self.paths: list[Path] = []
        for i in range(k):
            model = TinyNet()
            model.load_state_dict(base.state_dict())
            self._train(model, x_train, y_train, lr=0.02 * (i + 1), steps=20, gen=gen)
            path = Path(directory) / f"tiny_{i}.safetensors"
            soupkit.save_state_dict({n: t.detach().clone() for n, t in model.state_dict().items()}, path)
            self.paths.append(path)
        self.base = base
        self.pretrained = Path(directory) / "tiny_pretrained.safetensors"
        soupkit.save_state_dict({n: t.detach().clone() for n, t in base.state_dict().items()}, self.pretrained)

    @staticmethod
    def _train(model: nn.Module, x: Tensor, y: Tensor, lr: float, steps: int, gen: torch.Generator) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        model.train()
        for _ in range(steps):
            idx = torch.randperm(len(y), generator=gen)[:64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        model.eval()

    def perturbed_heldout(self, scale: float) -> Batches:
        """The held-out batches with ``scale * N(0, 1)`` added to the inputs (a deliberately different input)."""
        gen = torch.Generator().manual_seed(99)
        return [(x + scale * torch.randn(x.shape, generator=gen), y) for x, y in self.heldout]


def method_options(name: str) -> dict[str, Any]:
    """The options of every run here: no progress bars, seed 0; MEHL in blocks of 2 (3 blocks over K = 6)."""
    options: dict[str, Any] = {"progress": False, "seed": 0}
    if name.startswith("mehl"):
        options["model_batch_size"] = 2
    return options


def run_method(name: str, pool: TinyPool, device: str, heldout: Batches | None = None,
               **options: Any) -> dict[str, Any]:
    """``make_soup(name)`` on the tiny pool on ``device``: coefficients ``[K]`` or ``[K, L]`` (on CPU, float32),
    the soup's weights (on CPU; None for the ensemble) and the test accuracy (also as a count of examples)."""
    model = TinyNet().to(device)
    result: SoupResult = make_soup(name, model, CheckpointPool([str(p) for p in pool.paths],
                                                               pretrained=str(pool.pretrained)),
                                   heldout if heldout is not None else pool.heldout, device=device,
                                   **{**method_options(name), **options})
    acc = evaluate(model, result, pool.test, device)
    soup = None if result.state_dict is None else {k: v.detach().float().cpu() for k, v in result.state_dict.items()}
    return {"coefficients": result.coefficients.detach().float().cpu(), "soup": soup, "accuracy": acc,
            "correct": round(acc * pool.test_examples), "seconds": result.stats.get("seconds_total")}


def compare(ref: dict[str, Any], got: dict[str, Any], coef_tol: float, acc_tol_examples: int) -> dict[str, Any]:
    """Max |Δcoefficient|, |Δcorrect test examples| and max |Δweight| of two ``run_method`` results; PASS when
    the first two are within the tolerances (the weights are reported, not judged)."""
    dcoef = (ref["coefficients"] - got["coefficients"]).abs().max().item()
    dcorrect = abs(ref["correct"] - got["correct"])
    dweight = None
    if ref["soup"] is not None and got["soup"] is not None:
        dweight = max(((ref["soup"][k] - got["soup"][k]).abs().max().item() for k in ref["soup"]), default=0.0)
    ok = math.isfinite(dcoef) and dcoef <= coef_tol and dcorrect <= acc_tol_examples
    return {"max_abs_dcoef": dcoef, "d_correct": dcorrect, "max_abs_dweight": dweight,
            "coef_tol": coef_tol, "acc_tol_examples": acc_tol_examples, "result": "PASS" if ok else "FAIL"}


def tolerances(device: str, reference: str) -> tuple[float, int]:
    """(coefficient tolerance, accuracy tolerance in examples): exact on one device type, else the stated ones."""
    if torch.device(device).type == torch.device(reference).type:
        return 0.0, 0
    return COEF_TOL, ACC_TOL_EXAMPLES


def equality(device: str, reference: str = "cpu", methods: list[str] | None = None, coef_tol: float | None = None,
             acc_tol_examples: int | None = None, perturb: float = 0.0, epochs: float | None = None,
             log=print) -> list[dict[str, Any]]:
    """Part 1: every method on ``reference`` and on ``device``; one row per method.

    ``coef_tol`` / ``acc_tol_examples`` replace the tolerances of :func:`tolerances`; ``perturb`` adds noise to
    the device run's held-out inputs (the check must then FAIL at tolerance 0: the test of the check itself);
    ``epochs`` replaces the methods' 5 (``--quick``: 1, the same code in a fifth of the steps).
    """
    extra = {} if epochs is None else {"epochs": epochs}
    default_coef, default_acc = tolerances(device, reference)
    coef_tol = default_coef if coef_tol is None else coef_tol
    acc_tol = default_acc if acc_tol_examples is None else acc_tol_examples
    rows = []
    with tempfile.TemporaryDirectory(prefix="soupkit-gpu-check-") as tmp:
        pool = TinyPool(Path(tmp))
        heldout = pool.perturbed_heldout(perturb) if perturb else None
        for name in methods or list(METHODS):
            ref = run_method(name, pool, reference, **extra)
            got = run_method(name, pool, device, heldout, **extra)
            row = {"method": name, "device": device, "reference": reference, "perturb": perturb,
                   "acc_reference": ref["accuracy"], "acc_device": got["accuracy"],
                   "coef_shape": "x".join(map(str, ref["coefficients"].shape)),
                   "seconds_reference": ref["seconds"], "seconds_device": got["seconds"],
                   **compare(ref, got, coef_tol, acc_tol)}
            rows.append(row)
            log(f"  {name:14s} acc {ref['accuracy']:.4f} ({reference}) {got['accuracy']:.4f} ({device})  "
                f"max|dcoef| {row['max_abs_dcoef']:.2e} (tol {coef_tol:g})  d_correct {row['d_correct']} "
                f"(tol {acc_tol})  {row['result']}")
    return rows
