"""GPU check, part 4: how far do low-precision directions and autocast move a soup from its float32 result?

On the tiny pool of ``gpu_check_pool.py``, on one device: Learned-Soup+, HL-Soup+ and MEHL-Soup+ in float32, then
with ``direction_dtype`` bf16 / fp16 (HL/MEHL only: Learned-Soup has no directions) and with ``autocast``
bf16 / fp16 (every learned soup). Each variant is compared with the float32 run of the same method on the same
device: test accuracy difference in points and max |Δcoefficient|.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from gpu_check_pool import TinyPool, run_method

DRIFT_METHODS = ("learned+", "hl+", "mehl+")
VARIANTS: dict[str, dict[str, str]] = {
    "direction_dtype=bf16": {"direction_dtype": "bfloat16"},
    "direction_dtype=fp16": {"direction_dtype": "float16"},
    "autocast=bf16": {"autocast": "bf16"},
    "autocast=fp16": {"autocast": "fp16"},
}

# Tolerances of the drift (a bound on what the low precision may cost, not a kernel-noise bound). bf16 keeps 8
# significant bits (unit roundoff 2^-8 = 0.4 %), fp16 11 (0.05 %). Rounding the directions once moves each
# product <g, d_i> by about that fraction, and AdamW's normalised steps turn a relative gradient error e into
# coefficient changes of about lr * e per step: 20 steps at lr <= 0.05 and e = 0.4 % give ~4e-3; the bound
# is 0.02 to leave room for the forward's rounding under autocast (activations in bf16). Accuracy: 2 points
# (8 of the 400 test examples), well inside the gaps between methods that the paper's tables resolve.
DRIFT_COEF_TOL = 0.02
DRIFT_ACC_TOL_POINTS = 2.0


def applies(method: str, variant: str) -> bool:
    """``direction_dtype`` only means something for the hyperplane soups; autocast for every learned soup."""
    return not (variant.startswith("direction_dtype") and method.startswith("learned"))


def drift(device: str, methods: tuple[str, ...] = DRIFT_METHODS, coef_tol: float = DRIFT_COEF_TOL,
          acc_tol_points: float = DRIFT_ACC_TOL_POINTS, epochs: float | None = None,
          log=print) -> list[dict[str, Any]]:
    """Part 4: one row per (method, variant), including the variants that do not apply (status says so);
    ``epochs`` replaces the methods' 5 (``--quick``: 1)."""
    extra = {} if epochs is None else {"epochs": epochs}
    rows = []
    with tempfile.TemporaryDirectory(prefix="soupkit-gpu-drift-") as tmp:
        pool = TinyPool(Path(tmp))
        for method in methods:
            ref = run_method(method, pool, device, **extra)
            for variant, options in VARIANTS.items():
                row: dict[str, Any] = {"method": method, "variant": variant, "device": device,
                                       "acc_float32": ref["accuracy"], "coef_tol": coef_tol,
                                       "acc_tol_points": acc_tol_points}
                if not applies(method, variant):
                    rows.append({**row, "status": "not applicable (no directions)", "result": "n/a"})
                    log(f"  {method:9s} {variant:22s} not applicable (Learned-Soup has no directions)")
                    continue
                try:
                    got = run_method(method, pool, device, **options, **extra)
                except Exception as err:  # noqa: BLE001  (a dtype the device cannot run is a result, not a crash)
                    rows.append({**row, "status": f"failed: {type(err).__name__}: {err}"[:300], "result": "FAIL"})
                    log(f"  {method:9s} {variant:22s} FAILED: {type(err).__name__}: {err}")
                    continue
                dacc = 100 * (got["accuracy"] - ref["accuracy"])
                dcoef = (got["coefficients"] - ref["coefficients"]).abs().max().item()
                ok = abs(dacc) <= acc_tol_points and dcoef <= coef_tol
                rows.append({**row, "status": "ok", "acc_variant": got["accuracy"], "d_acc_points": dacc,
                             "max_abs_dcoef": dcoef, "seconds": got["seconds"], "result": "PASS" if ok else "FAIL"})
                log(f"  {method:9s} {variant:22s} acc {got['accuracy']:.4f} vs {ref['accuracy']:.4f} float32 "
                    f"({dacc:+.2f} pt, tol {acc_tol_points:g})  max|dcoef| {dcoef:.2e} (tol {coef_tol:g})  "
                    f"{'PASS' if ok else 'FAIL'}")
    return rows
