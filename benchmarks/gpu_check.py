#!/usr/bin/env python
"""The GPU check: one command, four questions, within a time budget (default 480 s on one GPU).

1. Does every method of ``soupkit.METHODS`` give on the device what it gives on CPU (tiny pool)?
   Coefficients within 1e-4 and test accuracy within one example (``gpu_check_pool.py`` says why); on CPU
   against CPU (``--device cpu``) exactly equal.
2. Peak memory and time per epoch of Learned-Soup+ and MEHL-Soup+ (b = min(18, K)) at the ViT-B/32 scale for
   K = 8, 24, 72 synthetic checkpoints, one fresh process each, the planner's prediction beside every run, and
   the ratio at K = 72 measured (``gpu_check_memory.py``; a run that runs out of memory is "did not fit").
3. One MEHL-Soup+ inner step against one plain training step of the same model on the same batch.
4. Accuracy and coefficient drift of bf16/fp16 directions and bf16/fp16 autocast against float32 (tiny pool,
   ``gpu_check_drift.py``).

    python benchmarks/gpu_check.py --device cuda --out outputs/gpu_check      # one GPU, <= 8 min (estimate)
    python benchmarks/gpu_check.py --device cpu --quick --out outputs/gpu_check_cpu  # every code path, tiny sizes

``--quick`` shrinks parts 2 and 3 to the tiny open_clip ViT of the benchmark tests and K = 2, 4 (a smoke test
of the code, not a result). Outputs under ``--out``: ``part1_equality.csv``, ``part2_memory.csv``,
``part3_steps.csv``, ``part4_drift.csv``, ``summary.json`` (PASS/FAIL per check, the tolerances, the time of
each part) and ``memory_vs_k.png``. Before each part and each run of part 2 the elapsed time is checked
against ``--budget-s``; what would pass it is not started, and the summary says so.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the helper modules beside this script, also when it is loaded by path (tests)
    sys.path.append(str(HERE))
from _bench_common import ROOT, environment  # noqa: E402  (first: it imports soupkit, which pins the CPU numerics)

import torch  # noqa: E402
from gpu_check_drift import DRIFT_ACC_TOL_POINTS, DRIFT_COEF_TOL, drift  # noqa: E402
from gpu_check_memory import Setup, make_runner, memory_checks, memory_sweep, plot, step_ratio  # noqa: E402
from gpu_check_pool import equality, tolerances  # noqa: E402

from soupkit.io import atomic_write_text  # noqa: E402

# parts 2 and 3 at the paper's scale or the tiny smoke-test scale of tests/test_benchmarks.py; tiny_epochs: the
# epochs of the soups of parts 1 and 4 (None: the methods' own 5)
SIZES = {
    "full": {"arch": "ViT-B-32", "num_classes": 1000, "ks": [8, 24, 72], "b": 18, "batch": 128, "heldout": 256,
             "inner": 2, "step_batch": 128, "step_warmup": 2, "step_pairs": 10, "tiny_epochs": None},
    "quick": {"arch": "tiny", "num_classes": 10, "ks": [2, 4], "b": 18, "batch": 2, "heldout": 4, "inner": 2,
              "step_batch": 2, "step_warmup": 1, "step_pairs": 2, "tiny_epochs": 1},
}
# The seconds a part is expected to need at least; it is not started with less left (estimates for one H200,
# see benchmarks/README.md; quick: measured on the 2-core CPU). Part 2 also checks before each of its runs.
MIN_SECONDS = {"full": {1: 45, 2: 150, 3: 40, 4: 40}, "quick": {1: 10, 2: 10, 3: 5, 4: 10}}
PART_NAMES = {1: "part 1: device vs CPU, every method", 2: "part 2: peak memory and time vs K",
              3: "part 3: MEHL-Soup+ inner step / plain step", 4: "part 4: bf16/fp16 drift"}
SCALE_TARGETS = ("part2_planner", "part2_mehl_flat", "part3_step_ratio")  # reported but not judged in --quick
STEP_RATIO_TARGET = 1.2  # memory_time.py's target: one inner step at most 1.2 x one plain step


class BudgetExceeded(RuntimeError):
    """A part would run past ``--budget-s``: the check stops there and says so."""


class Budget:
    """Wall-clock seconds since the start against the budget."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def require(self, what: str, need: float) -> None:
        if need > self.left():
            raise BudgetExceeded(f"stopping before {what}: {self.elapsed():.0f} s elapsed + {need:.0f} s expected "
                                 f"> budget {self.seconds:.0f} s")


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Every key of every row is a column (first appearance order); floats to 6 significant digits."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reference", default="cpu", help="part 1 compares the device with this device")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    p.add_argument("--quick", action="store_true", help="tiny parts 2 and 3 (a smoke test of every code path)")
    p.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    p.add_argument("--budget-s", type=float, default=480.0, help="stop before a part that would pass this")
    p.add_argument("--ks", nargs="+", type=int, default=None, help="part 2's K (default 8 24 72; quick 2 4)")
    p.add_argument("--ckpt-dtype", default="float16",
                   help="dtype of the synthetic checkpoint files (float16 halves writing and reading them; they "
                        "are cast to float32 when read, so the soups and their memory are float32's); "
                        "'float32' for files in the model's dtype")
    p.add_argument("--checkpoints", type=Path, default=None, help="where the K files go (default OUT/ckpt_ARCH)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep (and later reuse) the checkpoint files")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads here and in the workers (default: 1 on CPU, torch's default on CUDA)")
    p.add_argument("--no-fork", action="store_true", help="a new interpreter per run instead of forked workers")
    p.add_argument("--part1-methods", nargs="+", default=None, help="part 1's methods (default: every one)")
    p.add_argument("--part1-coef-tol", type=float, default=None, help="override part 1's coefficient tolerance")
    p.add_argument("--part1-acc-tol", type=int, default=None, help="override part 1's tolerance (test examples)")
    p.add_argument("--part1-perturb", type=float, default=0.0,
                   help="add this much noise to the device run's held-out inputs (tests the check: with "
                        "--part1-coef-tol 0 it must FAIL)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, log=print) -> dict[str, Any]:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    mode = "quick" if args.quick else "full"
    size = dict(SIZES[mode])
    if args.ks:
        size["ks"] = sorted(args.ks)
    cuda = torch.device(args.device).type == "cuda"
    threads = args.threads if args.threads is not None else (None if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    if cuda:
        env.update(allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   allow_tf32_cudnn=torch.backends.cudnn.allow_tf32)
    log(f"soupkit GPU check ({mode}): device {args.device} ({env['device_name']}), torch {env['torch_version']}, "
        f"budget {args.budget_s:.0f} s" + ("" if cuda else " -- NOT a GPU: no GPU result comes from this run"))
    checks: dict[str, dict[str, Any]] = {}
    part_seconds: dict[str, float] = {}
    files: dict[str, str] = {}
    stopped = None
    selected = sorted(args.parts)
    setup = None
    runner = make_runner(args.device, not args.no_fork, log) if {2, 3} & set(selected) else None
    ckpt_dir = args.checkpoints or out / f"ckpt_{size['arch']}_{size['num_classes']}"

    def reserve(after: int) -> float:  # what the parts after this one need at least
        return sum(MIN_SECONDS[mode][q] for q in selected if q > after)

    try:
        for part in selected:
            budget.require(PART_NAMES[part], MIN_SECONDS[mode][part] + reserve(part))
            if runner is not None:
                runner.start()  # the workers' template imports its libraries while part 1 runs
            t0 = time.perf_counter()
            log(f"{PART_NAMES[part]} ({budget.elapsed():.0f} s elapsed)")
            if part == 1:
                rows = equality(args.device, args.reference, args.part1_methods, coef_tol=args.part1_coef_tol,
                                acc_tol_examples=args.part1_acc_tol, perturb=args.part1_perturb,
                                epochs=size["tiny_epochs"], log=log)
                coef_tol, acc_tol = tolerances(args.device, args.reference)
                failed = [r["method"] for r in rows if r["result"] != "PASS"]
                checks["part1_equality"] = {
                    "result": "FAIL" if failed else "PASS", "failed": failed,
                    "coef_tol": rows[0]["coef_tol"], "acc_tol_examples": rows[0]["acc_tol_examples"],
                    "default_tolerances": {"coef_tol": coef_tol, "acc_tol_examples": acc_tol},
                    "perturb": args.part1_perturb,
                    "how": f"every method on {args.reference} and on {args.device}: max |dcoef| and |d correct "
                           "test examples| within the tolerances (0 and 0 on one device type)"}
                files["part1"] = str(write_csv(rows, out / "part1_equality.csv"))
            elif part in (2, 3):
                if setup is None:
                    need = max(size["ks"]) if 2 in selected else min(size["b"], max(size["ks"]))
                    setup = Setup(size["arch"], size["num_classes"], need, ckpt_dir, args.device,
                                  None if args.ckpt_dtype == "float32" else args.ckpt_dtype)
                    cast = ", cast to float32 when read" if setup.cast else ""
                    log(f"  {need} synthetic {size['arch']} checkpoints ({setup.num_parameters / 1e6:.3g} M "
                        f"parameters, files in {setup.file_dtype}{cast}) "
                        f"in {setup.checkpoint_seconds:.0f} s; planner activations measured in "
                        f"{setup.activation_seconds:.0f} s ({setup.activations.source})")
                if part == 2:
                    rows = memory_sweep(setup, runner, size["ks"], device=args.device, b=size["b"],
                                        batch=size["batch"], heldout=size["heldout"], inner=size["inner"],
                                        soup_options={}, time_left=lambda: budget.left() - reserve(2),
                                        threads=threads, log=log)
                    checks.update(memory_checks(rows, size["ks"], size["b"]))
                    files["part2"] = str(write_csv(rows, out / "part2_memory.csv"))
                    files["figure"] = str(plot(rows, out / "memory_vs_k.png",
                                               f"{size['arch']}, {env['device_name']}: batch {size['batch']}, "
                                               f"MEHL-Soup+ b = min({size['b']}, K); planner open markers"))
                    ratio = checks["part2_ratio_at_largest_K"]
                    if ratio.get("value") is not None:
                        log(f"  Learned-Soup+ / MEHL-Soup+ at K = {ratio['K']}: {ratio['value']:.2f} measured, "
                            f"{ratio['predicted']:.2f} planner")
                else:
                    bk = min(size["b"], max(size["ks"]))
                    steps = step_ratio(setup, runner, device=args.device, b=bk, batch=size["step_batch"],
                                       warmup=size["step_warmup"], pairs=size["step_pairs"], soup_options={},
                                       timeout=max(1.0, budget.left() - reserve(3)), threads=threads, log=log)
                    ok = steps["status"] == "ok"
                    checks["part3_step_ratio"] = {
                        "result": ("PASS" if steps["step_ratio"] <= STEP_RATIO_TARGET else "FAIL") if ok else "FAIL",
                        "value": steps.get("step_ratio"), "target": STEP_RATIO_TARGET, "status": steps["status"],
                        "how": "median over alternating pairs of (MEHL-Soup+ inner step / plain AdamW step)"}
                    summary_row = {"pair": "summary", **{k: v for k, v in steps.items() if k != "rows"}}
                    files["part3"] = str(write_csv([summary_row] + steps.get("rows", []), out / "part3_steps.csv"))
            else:
                rows = drift(args.device, epochs=size["tiny_epochs"], log=log)
                bad = [f"{r['method']} {r['variant']}" for r in rows if r["result"] == "FAIL"]
                checks["part4_drift"] = {"result": "FAIL" if bad else "PASS", "failed": bad,
                                         "coef_tol": DRIFT_COEF_TOL, "acc_tol_points": DRIFT_ACC_TOL_POINTS,
                                         "how": "each variant against float32 on the same device"}
                files["part4"] = str(write_csv(rows, out / "part4_drift.csv"))
            part_seconds[str(part)] = time.perf_counter() - t0
            log(f"  {PART_NAMES[part]}: {part_seconds[str(part)]:.0f} s (elapsed {budget.elapsed():.0f} s "
                f"of {args.budget_s:.0f} s)")
    except BudgetExceeded as err:
        stopped = str(err)
        log(f"BUDGET: {stopped}")
    finally:
        if runner is not None:
            runner.close()
        if not args.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    for part in selected:
        if str(part) not in part_seconds:
            checks[f"part{part}_not_run"] = {"result": "NOT RUN", "why": stopped or "not reached"}
    for name, c in checks.items():  # a target of the ViT-B/32 scale says nothing about the tiny smoke sizes
        c["judged"] = not (args.quick and name in SCALE_TARGETS)
    judged = [c["result"] for c in checks.values() if c["judged"] and c["result"] in ("PASS", "FAIL", "NOT RUN")]
    summary = {
        "overall": "PASS" if judged and all(r == "PASS" for r in judged) else "FAIL",
        "mode": mode, "gpu_result": cuda and not args.quick, "checks": checks, "part_seconds": part_seconds,
        "stopped": stopped, "budget_s": args.budget_s, "wall_seconds": budget.elapsed(), "sizes": size,
        "checkpoint_dtype": args.ckpt_dtype, "environment": env, "files": files,
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for name, c in checks.items():
        value = f"  value {c['value']:.3g}" if isinstance(c.get("value"), float) else ""
        log(f"{name:28s} {c['result']}{value}" + ("" if c["judged"] else "  (not judged with --quick: a target "
                                                                          "of the ViT-B/32 scale)"))
    log(f"overall {summary['overall']}; wrote {out / 'summary.json'} ({summary['wall_seconds']:.0f} s in all)")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["overall"] == "PASS" else 1)
