#!/usr/bin/env python
"""Memory and time of Learned-Soup+, HL-Soup+ and MEHL-Soup+ at the ViT-B/32 scale (the paper's headline claim).

What is measured, all in one run:

(a) peak memory of ``make_soup("learned+" | "hl+" | "mehl+")`` for K = 2, 4, 8, ... checkpoints, as measured by
    the core (``stats["peak_memory_bytes"]``: the CUDA allocator's peak on a GPU; on CPU the process's peak RSS
    above its level at the start of ``make_soup``). EVERY (method, K) runs in a FRESH subprocess, so the RSS
    high-water mark and allocator caches of an earlier run cannot leak into the next number. K stops growing
    for a method once its projected memory (a line through its last two points) would pass ``--mem-cap-gib``.
(b) time of one MEHL-Soup+ inner step (``soupkit.engine.loop.optimise`` for one step over the ``HyperplaneSpace`` of b
    models that ``make_soup("mehl+")`` builds) / time of one plain training step of the same model on the same
    batch (forward + backward + AdamW on the model's parameters): one fresh process, the two kinds of step
    alternating (M P, P M, ...) so both see the same machine load; the median over pairs of the ratio.
(c) seconds per epoch over the held-out data (``stats["seconds_per_epoch"]``: whole ``make_soup`` time, reading
    checkpoints included, over the epochs it made).

CPU memory and glibc: with glibc's default (dynamic) mmap threshold, freed tensors stay in fragmented heap
arenas and the peak RSS of one and the same run varied by 50 % here (Learned-Soup+, K = 4: 6.6 to 9.9 models'
worth over 5 runs). By default (``--malloc live``) the memory runs therefore fix ``MALLOC_MMAP_THRESHOLD_`` so
that the RSS follows the live tensors (repeats to 0.1 %; the analogue of ``torch.cuda.max_memory_allocated``),
and since that makes every large allocation fault in fresh pages (Learned-Soup+ ran 2.6x slower), the times
(c) come from a second, ordinary run of each (method, K); its peak RSS is kept as
``peak_memory_bytes_default_malloc``. Every MEHL-Soup+ block holds the same tensors, so its memory runs stop
after ``--mem-mehl-blocks`` blocks; its time runs make the full pass over the K models.

The model, the K checkpoints and the held-out data are built in ``_bench_common.py`` (the ViT-B/32 vision tower
with random weights, a linear head over 1000 classes, K seeded-noise fine-tunes as safetensors, random images).

Targets (printed PASS/MISS; nothing is tuned to pass):

* MEHL-Soup+ peak memory flat in K: (max / min - 1) <= 10 % over the measured K >= 8;
* Learned-Soup+ / MEHL-Soup+ peak memory >= 13 at K = 72 (from a least-squares line through each method's
  measured points when K = 72 was not measured; then labelled EXTRAPOLATED);
* MEHL-Soup+ inner step <= 1.2 x plain training step.

Usage (add ``--publish`` to copy the CSV and the figure to data/results/ and figures/)::

    python benchmarks/memory_time.py --device cpu --ks 2 4 8 16 32 --out outputs/benchmarks --publish
    python benchmarks/memory_time.py --device cuda --ks 2 4 8 16 32 48 72 --b 18 --batch 128 --heldout 256 \
        --step-batch 128 --threads 0 --out outputs/benchmarks --publish

The pieces, one question or shared part a file (imported by name from this folder): ``memory_time_sweep.py``
(a) and (c), ``memory_time_steps.py`` (b), ``memory_time_analysis.py`` (fits, targets, CSV files, the printed
report), ``memory_time_plot.py`` (the figure, ``--plot-only``), ``_bench_launcher.py`` (the fresh processes),
``_bench_common.py`` (model, checkpoints, data, environment).

Outputs under ``--out``: ``benchmark_<device>.csv`` (one row per method x K), ``steps_<device>.csv`` (every timed
step), ``summary_<device>.json`` (ratios, fits, targets, environment), ``benchmark_memory_vs_k_<device>.png``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the helper modules beside this script, also when it is loaded by path (tests)
    sys.path.append(str(HERE))
# first: _bench_common imports soupkit (from the checkout if it is not installed), which pins the CPU numerics
# before torch loads
from _bench_common import (MALLOC_ENV, METHODS, ROOT, _set_threads, build_model,  # noqa: E402
                           default_cap_bytes, environment, make_checkpoints, state_bytes)

import torch  # noqa: E402
from _bench_launcher import Launcher, _template  # noqa: E402
from memory_time_analysis import analyse, print_report, read_rows, write_csv  # noqa: E402
from memory_time_plot import plot, plot_from_csv  # noqa: E402
from memory_time_steps import time_steps  # noqa: E402
from memory_time_sweep import merge, run_soup, run_sweep  # noqa: E402


# ---- the fresh processes' work (run by _bench_launcher through this script's __main__) ---------------------------
def _worker(task_json: str, out: str) -> None:
    task = json.loads(task_json)
    _set_threads(task.pop("threads", None))
    kind = task.pop("kind")
    result = run_soup(**task) if kind == "soup" else time_steps(**task)
    Path(out).write_text(json.dumps(result))


# ---- CLI ----------------------------------------------------------------------------------------------------------
def _soup_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value parsed as soupkit's CLI parses ``--option``."""
    from soupkit.cli import parse_option  # noqa: PLC0415

    return parse_option(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="ViT-B-32", help="open_clip model name (its vision tower is used) or 'tiny'")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ks", nargs="+", type=int, default=[2, 4, 8, 16, 32])
    p.add_argument("--b", type=int, default=2, help="MEHL-Soup+ model batch size, the same for every K")
    p.add_argument("--inner-iterations", type=int, default=2, help="inner steps per block of models")
    p.add_argument("--heldout", type=int, default=4, help="held-out images (random, 224 px for ViT-B-32)")
    p.add_argument("--batch", type=int, default=2, help="held-out batch size of the soups")
    p.add_argument("--mem-mehl-blocks", type=int, default=2,
                   help="CPU memory runs of MEHL+ stop after this many blocks (every block holds the same "
                        "tensors); the timing runs always make the full pass. 0 = full pass")
    p.add_argument("--step-batch", type=int, default=8, help="batch of the step-time comparison (b)")
    p.add_argument("--step-warmup", type=int, default=1, help="untimed pairs of steps")
    p.add_argument("--step-pairs", type=int, default=6, help="timed pairs (one MEHL+ step, one plain step)")
    p.add_argument("--skip-steps", action="store_true", help="do not measure (b)")
    p.add_argument("--mem-cap-gib", type=float, default=None,
                   help="largest projected memory of one run (default: 75%% of RAM on CPU, 90%% of the GPU)")
    p.add_argument("--malloc", choices=sorted(MALLOC_ENV), default="live",
                   help="CPU: 'live' measures memory in runs with a fixed glibc mmap threshold (RSS follows live "
                        "tensors) and time in separate ordinary runs; 'default' measures both in one ordinary run")
    p.add_argument("--noise", type=float, default=1e-3, help="fine-tune perturbation, times each tensor's std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--soup-option", action="append", default=[], type=_soup_option, metavar="KEY=VALUE",
                   help="a further make_soup option for every soup and the step timing, e.g. "
                        "direction_dtype=bfloat16, autocast=bf16, clip_grad_norm=1 (repeatable)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker; 0 = torch's default. 1 is robust on a shared CPU")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks")
    p.add_argument("--checkpoints", type=Path, default=None, help="where the K safetensors go (default OUT/ckpt_...)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep (and later reuse) the checkpoint files")
    p.add_argument("--no-isolate", action="store_true", help="measure in this process (tests only: polluted RSS)")
    p.add_argument("--no-fork", action="store_true",
                   help="start a new interpreter for every run instead of forking a template that has imported "
                        "the libraries (slower; the same isolation)")
    p.add_argument("--plot-only", type=Path, default=None, metavar="CSV",
                   help="only redraw the figure from this benchmark CSV (nothing is measured)")
    p.add_argument("--plot-out", type=Path, default=None,
                   help="with --plot-only: where the PNG goes (default: figures/benchmark_memory_vs_k_<device>.png)")
    p.add_argument("--publish", action="store_true",
                   help="copy the CSV to data/results/benchmark_<device>.csv and the figure to figures/")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, log=print) -> dict[str, Any]:
    args = parse_args(argv)
    if args.plot_only is not None:
        tag = str(read_rows(args.plot_only)[0].get("device") or "cpu").split(":")[0]
        fig = plot_from_csv(args.plot_only, args.plot_out or ROOT / "figures" / f"benchmark_memory_vs_k_{tag}.png")
        log(f"redrew {fig} from {args.plot_only}")
        return {"figure": str(fig), "csv": str(args.plot_only)}
    started = time.perf_counter()
    dev_type = torch.device(args.device).type
    tag = dev_type
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = args.checkpoints or out / f"ckpt_{args.arch}_{args.num_classes}"
    cap = int(args.mem_cap_gib * 2**30) if args.mem_cap_gib else default_cap_bytes(args.device)
    threads = args.threads or None
    _set_threads(threads)
    split = dev_type == "cpu" and args.malloc == "live" and not args.no_isolate
    env = environment(args.device)
    log(f"soupkit memory/time benchmark: {args.arch} vision tower + {args.num_classes}-class head, device "
        f"{args.device} ({env['device_name']}), torch {env['torch_version']}, threads {env['threads']}, "
        f"load avg {env['loadavg_1_5_15']}")

    t0 = time.perf_counter()
    model = build_model(args.arch, args.num_classes, args.seed)
    n_params, mbytes = sum(p.numel() for p in model.parameters()), state_bytes(model)
    need = max(args.ks + ([args.b] if not args.skip_steps else []))
    paths = make_checkpoints(model, need, ckpt_dir, args.seed, args.noise)
    del model
    gc.collect()
    log(f"{need} checkpoints of {n_params / 1e6:.1f} M parameters ({mbytes / 2**20:.0f} MiB each) in {ckpt_dir} "
        f"({time.perf_counter() - t0:.0f} s); memory cap {cap / 2**30:.1f} GiB per run")

    common = {"arch": args.arch, "num_classes": args.num_classes, "device": args.device, "b": args.b,
              "inner_iterations": args.inner_iterations, "heldout_images": args.heldout, "batch_size": args.batch,
              "seed": args.seed, "soup_options": dict(args.soup_option)}
    steps, time_rows = None, None
    fork = not args.no_fork
    mem_env = MALLOC_ENV[args.malloc] if dev_type == "cpu" else {}
    with Launcher(None, fork) as plain, Launcher(mem_env, fork) as measuring:
        try:
            if not args.skip_steps:
                t0 = time.perf_counter()
                task = {"paths": [str(p) for p in paths], "arch": args.arch, "num_classes": args.num_classes,
                        "device": args.device, "b": args.b, "batch_size": args.step_batch,
                        "warmup": args.step_warmup, "pairs": args.step_pairs, "seed": args.seed,
                        "soup_options": dict(args.soup_option)}
                if args.no_isolate:
                    steps, err = time_steps(**task), ""
                else:
                    steps, err = plain.run({"kind": "steps", "threads": threads, **task}, args.timeout)
                if steps is None:
                    log(f"step timing FAILED: {err}")
                else:
                    write_csv(steps["rows"], out / f"steps_{tag}.csv", ["pair", "kind", "seconds", "warmup", "first"])
                    log(f"step timing ({time.perf_counter() - t0:.0f} s): mehl+ {steps['mehl_step_seconds']:.3f} s, "
                        f"plain {steps['plain_step_seconds']:.3f} s, median pair ratio {steps['step_ratio']:.3f}")
            t0 = time.perf_counter()
            log("memory runs (a fresh process each" + (", glibc mmap threshold fixed):" if split else "):"))
            rows = run_sweep(paths, args.methods, args.ks, cap_bytes=cap,
                             launcher=None if args.no_isolate else measuring, timeout=args.timeout,
                             mehl_blocks=(args.mem_mehl_blocks or None) if split else None, threads=threads,
                             log=log, **common)
            log(f"  ({time.perf_counter() - t0:.0f} s)")
            if split:
                t0 = time.perf_counter()
                done = {m: [r["K"] for r in rows if r["method"] == m and r.get("status") == "ok"]
                        for m in args.methods}
                log("time runs (a fresh process each, ordinary glibc malloc, full pass):")
                time_rows = run_sweep(paths, args.methods, done, cap_bytes=cap, launcher=plain, timeout=args.timeout,
                                      mehl_blocks=None, threads=threads, log=log, **common)
                log(f"  ({time.perf_counter() - t0:.0f} s)")
        finally:
            if not args.keep_checkpoints:
                shutil.rmtree(ckpt_dir, ignore_errors=True)

    rows = merge(rows, time_rows)
    summary = analyse(rows, steps)
    summary.update({
        "setup": {"arch": args.arch, "model": "open_clip vision tower (quick_gelu=True, random weights) + "
                                              f"L2-normalised features + linear head over {args.num_classes} classes",
                  "num_parameters": n_params, "model_bytes": mbytes, "ks": args.ks, "methods": args.methods,
                  "mehl_model_batch_size": args.b, "inner_iterations": args.inner_iterations,
                  "heldout_images": args.heldout, "batch": args.batch, "noise": args.noise, "seed": args.seed,
                  "mem_cap_bytes": cap, "malloc": args.malloc, "memory_and_time_in_separate_runs": split,
                  "memory_run_mehl_blocks": (args.mem_mehl_blocks or "full pass") if split else "full pass",
                  "threads": threads or torch.get_num_threads(), "isolated": not args.no_isolate,
                  "fresh_process": "no" if args.no_isolate else ("new interpreter" if args.no_fork or not
                                   hasattr(os, "fork") else "fork of an import-only template interpreter"),
                  "memory_meaning": ("CUDA allocator peak (max_memory_allocated) above its level at the start"
                                     if dev_type == "cuda" else
                                     "process peak RSS (VmHWM) above the RSS at the start of make_soup")},
        "environment": {**env, "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "steps": {k: v for k, v in (steps or {}).items() if k != "rows"} or None,
        "wall_seconds": time.perf_counter() - started,
        "command": "python benchmarks/memory_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    })
    csv_path = write_csv(rows, out / f"benchmark_{tag}.csv")
    (out / f"summary_{tag}.json").write_text(json.dumps(summary, indent=1, default=str))
    fig = plot(rows, summary, out / f"benchmark_memory_vs_k_{tag}.png",
               f"{args.arch} vision tower + {args.num_classes}-class head ({n_params / 1e6:.1f} M parameters), "
               f"{env['device_name']}, torch {env['torch_version']}; MEHL+ b={args.b}, "
               f"{args.inner_iterations} inner steps per block, batch {args.batch}")
    print_report(rows, steps, summary, log)
    if args.publish:
        for src, dst in ((csv_path, ROOT / "data" / "results" / f"benchmark_{tag}.csv"),
                         (fig, ROOT / "figures" / f"benchmark_memory_vs_k_{tag}.png")):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        log(f"published data/results/benchmark_{tag}.csv and figures/benchmark_memory_vs_k_{tag}.png")
    log(f"wrote {csv_path}, {out / f'summary_{tag}.json'}, {fig} ({summary['wall_seconds']:.0f} s in all)")
    summary["csv"], summary["figure"] = str(csv_path), str(fig)
    return summary


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        _worker(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 2 and sys.argv[1] == "_template":
        _template(_worker)
    else:
        main()
