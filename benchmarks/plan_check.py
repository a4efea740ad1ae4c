#!/usr/bin/env python
"""Predicted (``soupkit.experiments.plan``) against measured peak memory of every soup method, on the embedded zoo, on CPU.

Every (method, K) runs ``make_soup`` ``--repeats`` times (3), each in a FRESH interpreter, with the glibc setting of
``benchmarks/_bench_common.py`` (``MALLOC_ENV["live"]``: a fixed mmap threshold, so that the RSS follows the live
tensors) and its thread count (1); the measured number is the core's own ``stats["peak_memory_bytes"]``
(``soupkit.runtime.memory.PeakMemory``: peak RSS above the level at the start of ``make_soup``). ``ensemble`` builds
nothing: its number is the peak of computing its held-out logits (``soup_logits``, also in a ``PeakMemory``).
Learned soups make ``--inner-iterations`` steps and MEHL stops after 2 blocks (every block holds the same
tensors, as memory_time.py does); the held-out data are random images of the zoo's shape with random labels.

Measuring setting: ``MALLOC_ENV["live"]``'s fixed mmap threshold (16 KiB here, ``--mmap-threshold``) with 4 KiB
pages (``--hugetlb 0``), not memory_time.py's transparent huge pages (``glibc.malloc.hugetlb=1``). At the embedded
zoo's size (one model 0.8 MB) huge pages quantise the peak: the heap a method grows (allocations below the mmap
threshold: Python objects, the pool's records; 0.3-1 MB) reads as nothing or as a whole 2 MiB page, depending on
where the heap happens to stand when the run starts (it differs between identical processes). Measured here, uniform
at K = 4 with huge pages: 1.4-1.7 MB in six of ten identical runs, 3.6-4.2 MB in four; greedy 7.8-8.1 MB four times
in five, 10.1 once.
With 4 KiB pages the same runs repeat within 0.2 MB (uniform 2.3-2.4, greedy 9.5-9.7), and that heap is the
planner's ``H``. Each (method, K) is still measured ``--repeats`` times and compared by its median; the rows keep
every measurement and their range.

    python benchmarks/plan_check.py --zoo outputs/zoo --ks 4 16 32 --b 4 --batch 128   # ~17 min on 2 busy cores

Writes ``data/results/plan_check_cpu.csv`` (``--out``): method, K, b, predicted MB, the median, min and max of
the measured MB and every measurement, the ratio predicted / median, and the formula's terms; prints the table and
whether every ratio is within ``--tolerance`` (15 %).
"""
from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import soupkit  # noqa: E402,F401  (first: pins the CPU numerics before torch loads)
import torch  # noqa: E402

from _bench_common import MALLOC_ENV  # noqa: E402  (the measuring setting of the memory benchmark)
from soupkit.experiments import plan  # noqa: E402
from soupkit.io import atomic_write_text  # noqa: E402
from soupkit.methods.registry import METHODS as METHOD_INFO  # noqa: E402

METHODS = plan.FORMULAS.keys()
COLUMNS = ["method", "K", "b", "batch", "predicted_mb", "measured_mb", "measured_min_mb", "measured_max_mb",
           "repeats", "measurements_mb", "ratio", "within", "formula", "M_mb", "A_mb", "F_mb", "R_mb",
           "start_rss_mb", "seconds", "status"]


# ---- one measurement (in a fresh process) ------------------------------------------------------------------------
def _inputs(zoo_dir: str, k: int, n: int, batch: int, seed: int = 0):
    from soupkit import CheckpointPool  # noqa: PLC0415
    from soupkit.zoo.sources import open_zoo  # noqa: PLC0415

    zoo = open_zoo(zoo_dir)
    model = zoo.make_model()
    cfg = zoo.config.model
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    y = torch.randint(0, cfg.num_classes, (n,), generator=gen)
    loader = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    return model, CheckpointPool([str(p) for p in zoo.paths[:k]]), loader


def measure(method: str, zoo: str, k: int, b: int, batch: int, heldout: int, inner: int) -> dict[str, Any]:
    """``make_soup(method)`` on the zoo's first ``k`` models; its peak memory (call it in a fresh process)."""
    from soupkit import make_soup  # noqa: PLC0415
    from soupkit.engine.evaluation import predict
    from soupkit.methods.result import soup_logits  # noqa: PLC0415
    from soupkit.runtime.memory import PeakMemory, current_rss_bytes  # noqa: PLC0415

    torch.set_num_threads(1)
    model, pool, loader = _inputs(zoo, k, heldout, batch)
    options: dict[str, Any] = {"device": "cpu", "progress": False, "inner_iterations": inner}
    if METHOD_INFO[method].family == "mehl":
        options.update(model_batch_size=min(b, k), outer_iterations=min(2, -(-k // min(b, k))))
    if method in ("uniform", "ensemble"):
        # make_soup's preflight reads model 0 and runs one held-out forward before its meter for every method
        # that reads data; these two read none, so their first read and forward would carry the process's
        # one-time set-up (safetensors, kernels: ~4 MB and ~17 MB measured here) -- not the method's memory
        predict(model, pool.load(0), loader[:1], "cpu")
    gc.collect()
    start = current_rss_bytes()
    t0 = time.perf_counter()
    result = make_soup(method, model, pool, loader, **options)
    peak = result.stats["peak_memory_bytes"]
    if method == "ensemble":  # its members are read when it is evaluated: that is its memory
        with PeakMemory("cpu") as meter:
            soup_logits(model, result, loader, "cpu")
        peak = max(peak, meter.peak_bytes)
    return {"peak_bytes": int(peak), "start_rss_bytes": start, "seconds": time.perf_counter() - t0,
            "source": result.stats["memory_source"]}


def run_fresh(task: dict[str, Any], timeout: float) -> dict[str, Any]:
    """:func:`measure` in a new interpreter with memory_time.py's malloc setting (its mmap threshold and huge pages
    from the task); the result or ``{"error"}``."""
    env = {**os.environ, **MALLOC_ENV["live"], "MALLOC_MMAP_THRESHOLD_": str(task.pop("mmap_threshold")),
           "GLIBC_TUNABLES": f"glibc.malloc.hugetlb={task.pop('hugetlb', 0)}"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "_measure", json.dumps(task)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"rc={proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-2:])}
    return json.loads(lines[-1])


# ---- the check ---------------------------------------------------------------------------------------------------
def predictions(zoo: str, methods: Sequence[str], ks: Sequence[int], b: int, batch: int,
                heldout: int) -> dict[tuple[str, int], plan.Plan]:
    """``soupkit.experiments.plan`` for every (method, K); the activations measured once."""
    from soupkit.zoo.sources import open_zoo  # noqa: PLC0415

    z = open_zoo(zoo)
    model, cfg = z.make_model(), z.config.model
    acts = plan.measure_activations(model, (cfg.in_channels, cfg.image_size, cfg.image_size))
    size = plan.model_size(model)
    return {(m, k): plan.plan_memory(m, size, k, b=b, batch=batch, activations=acts, heldout=heldout)
            for m in methods for k in ks}


def summarise(predicted_mb: float, measured_mb: Sequence[float], tolerance: float) -> dict[str, Any]:
    """The row's measured part: median, min, max and every one of ``measured_mb``, and the prediction against the
    median (``ratio`` = predicted / median, ``within`` = |ratio - 1| <= tolerance)."""
    if not measured_mb:
        raise ValueError("summarise needs at least one measurement")
    median = statistics.median(measured_mb)
    ratio = predicted_mb / median if median else float("inf")
    return {"measured_mb": median, "measured_min_mb": min(measured_mb), "measured_max_mb": max(measured_mb),
            "repeats": len(measured_mb), "measurements_mb": ";".join(f"{v:.4f}" for v in measured_mb),
            "ratio": ratio, "within": abs(ratio - 1) <= tolerance}


def check(zoo: str, methods: Sequence[str], ks: Sequence[int], b: int, batch: int, heldout: int, inner: int,
          jobs: int, tolerance: float, timeout: float, mmap_threshold: int = 16384, repeats: int = 3,
          hugetlb: int = 0, log=print) -> list[dict[str, Any]]:
    """Predicted and measured peak of every (method, K), one row each, in the order of ``methods`` x ``ks``; each
    (method, K) measured ``repeats`` times, each time in a fresh process, and compared by its median."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    planned = predictions(zoo, methods, ks, b, batch, heldout)
    cases = [(m, k) for m in methods for k in ks]
    tasks = [{"method": m, "zoo": zoo, "k": k, "b": b, "batch": batch, "heldout": heldout, "inner": inner,
              "mmap_threshold": mmap_threshold, "hugetlb": hugetlb} for m, k in cases for _ in range(repeats)]
    rows = []
    with ThreadPoolExecutor(max_workers=jobs) as ex:  # each task is its own process: their RSS do not mix
        results = ex.map(lambda t: run_fresh(t, timeout), tasks)
        for m, k in cases:
            got = [next(results) for _ in range(repeats)]  # map keeps the order of the tasks
            p = planned[(m, k)]
            row = {"method": p.method, "K": p.k, "b": p.b, "batch": batch, "predicted_mb": p.peak_mb,
                   "formula": p.formula, **{f"{n}_mb": p.terms[n] / 2**20 for n in ("M", "A", "F", "R")}}
            errors = [g["error"] for g in got if "error" in g]
            if errors:  # a failed repeat fails the row: a median of the others would hide it
                row.update(status=f"{len(errors)} of {repeats} failed: {errors[0]}"[:200], measured_mb=None,
                           ratio=None, within=None, repeats=repeats)
            else:
                row.update(summarise(p.peak_mb, [g["peak_bytes"] / 2**20 for g in got], tolerance), status="ok",
                           start_rss_mb=statistics.median(g["start_rss_bytes"] for g in got) / 2**20,
                           seconds=statistics.median(g["seconds"] for g in got))
            rows.append(row)
            log(_line(row))
    return rows


def _line(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['method']:14s} {r['K']:4d} {r['b']:3d} {r['predicted_mb']:10.1f} {'-':>10s}  {r['status']}"
    spread = f"{r['measured_min_mb']:.1f}-{r['measured_max_mb']:.1f}"
    return (f"{r['method']:14s} {r['K']:4d} {r['b']:3d} {r['predicted_mb']:10.1f} {r['measured_mb']:10.1f} "
            f"{spread:>11s} {r['ratio']:7.3f}  {'ok' if r['within'] else 'OUTSIDE'}")


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", default=str(ROOT / "outputs" / "zoo"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--ks", nargs="+", type=int, default=[4, 16, 32])
    p.add_argument("--b", type=int, default=4, help="MEHL model_batch_size (clamped to K)")
    p.add_argument("--batch", type=int, default=128, help="held-out batch of every method")
    p.add_argument("--heldout", type=int, default=128, help="random held-out images")
    p.add_argument("--mmap-threshold", type=int, default=16384,
                   help="glibc MALLOC_MMAP_THRESHOLD_ of the measuring processes (memory_time.py: 131072, below "
                        "ViT-B/32's tensors; the zoo's are 64 KiB, so 16 KiB makes the RSS follow them too)")
    p.add_argument("--hugetlb", type=int, choices=[0, 1], default=0,
                   help="glibc.malloc.hugetlb of the measuring processes (memory_time.py: 1; see the docstring)")
    p.add_argument("--inner-iterations", type=int, default=2, help="steps per block (memory does not grow)")
    p.add_argument("--jobs", type=int, default=2, help="fresh processes at a time")
    p.add_argument("--repeats", type=int, default=3,
                   help="fresh processes per (method, K); the prediction is compared with their median")
    p.add_argument("--tolerance", type=float, default=plan.PLAN_TOLERANCE)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", type=Path, default=ROOT / "data" / "results" / "plan_check_cpu.csv")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    print(f"{'method':14s} {'K':>4s} {'b':>3s} {'pred. MB':>10s} {'median MB':>10s} {'range MB':>11s} {'ratio':>7s}")
    rows = check(args.zoo, args.methods, args.ks, args.b, args.batch, args.heldout, args.inner_iterations,
                 args.jobs, args.tolerance, args.timeout, args.mmap_threshold, args.repeats, args.hugetlb)
    path = write_csv(rows, args.out)
    done = [r for r in rows if r["status"] == "ok"]
    outside = [f"{r['method']} K={r['K']} ({r['ratio']:.2f})" for r in done if not r["within"]]
    print(f"{len(done)}/{len(rows)} measured; within {args.tolerance:.0%}: {len(done) - len(outside)}"
          + (f"; outside: {', '.join(outside)}" if outside else "") + f"; wrote {path} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0 if done and not outside and len(done) == len(rows) else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_measure":
        print(json.dumps(measure(**json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
