"""GPU check, parts 2 and 3 at the ViT-B/32 scale: peak memory and time of Learned-Soup+ and MEHL-Soup+ against K,
beside the planner's prediction; one MEHL-Soup+ inner step against one plain training step.

Both reuse the memory/time benchmark: the model, the synthetic checkpoints and the held-out data of
``_bench_common.py``, one fresh process per measurement (``_bench_launcher.Launcher`` running
``memory_time.py``'s worker: ``memory_time_sweep.run_soup`` and ``memory_time_steps.time_steps``), and the
core's own ``stats["peak_memory_bytes"]`` (on CUDA ``torch.cuda.max_memory_allocated`` above the level at the
start of ``make_soup``, its peak reset by ``soupkit.runtime.memory.PeakMemory``; on CPU peak RSS with the
benchmark's fixed glibc mmap threshold). The predictions are ``soupkit.experiments.plan.plan_memory`` with
the activations measured once by ``plan.measure_activations``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from _bench_common import MALLOC_ENV, build_model, make_checkpoints, state_bytes
from _bench_launcher import Launcher

import torch  # noqa: E402

from soupkit.experiments import plan  # noqa: E402

MEMORY_METHODS = ("learned+", "mehl+")
PLAN_TOL = 0.15  # benchmarks/plan_check.py's tolerance: the planner is a sum of copies, not a simulation
FLAT_TOL = 0.10  # memory_time.py's: MEHL+ peak flat in K for one b


class Setup:
    """The ViT (or tiny) model's size, its measured activations and the checkpoint files of parts 2 and 3."""

    def __init__(self, arch: str, num_classes: int, k: int, directory: Path, device: str, ckpt_dtype: str | None,
                 seed: int = 0, noise: float = 1e-3) -> None:
        from soupkit.config import parse_dtype  # noqa: PLC0415  (the option parser: "float16", "bf16", ...)

        self.arch, self.num_classes = arch, num_classes
        model = build_model(arch, num_classes, seed)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.model_bytes = state_bytes(model)
        self.size = plan.model_size(model, num_classes)
        size = model.visual.image_size
        self.input_shape = (3, *(size if isinstance(size, (tuple, list)) else (size, size)))
        t0 = time.perf_counter()
        self.activations = plan.measure_activations(model, self.input_shape, num_classes=num_classes)
        self.activation_seconds = time.perf_counter() - t0
        self.ckpt_dtype = parse_dtype(ckpt_dtype, "ckpt_dtype") if ckpt_dtype else None
        self.cast = self.ckpt_dtype not in (None, torch.float32)
        self.file_dtype = str(self.ckpt_dtype or torch.float32).replace("torch.", "")
        t0 = time.perf_counter()
        self.paths = make_checkpoints(model, k, directory, seed, noise, self.ckpt_dtype,
                                      device if torch.device(device).type == "cuda" else "cpu")
        self.checkpoint_seconds = time.perf_counter() - t0

    def predict(self, method: str, k: int, b: int, batch: int, device: str,
                soup_options: dict[str, Any] | None = None) -> plan.Plan:
        """The planner's peak for this run (fp16 files: a cast read, the planner's ``copy`` format)."""
        ddtype = (soup_options or {}).get("direction_dtype")
        if isinstance(ddtype, str):
            from soupkit.config import parse_dtype  # noqa: PLC0415

            ddtype = parse_dtype(ddtype, "direction_dtype")
        return plan.plan_memory(method, self.size, k, b=b, batch=batch, activations=self.activations,
                                device=device, direction_dtype=ddtype,
                                checkpoint_format="copy" if self.cast else "safetensors")


class Runner:
    """``Launcher.run`` that falls back to a new interpreter per run if forking a CUDA worker ever fails."""

    def __init__(self, env: dict[str, str], fork: bool, log=print) -> None:
        self.env, self.log = env, log
        self.launcher = Launcher(env, fork)

    def start(self) -> None:
        self.launcher.start()

    def run(self, task: dict[str, Any], timeout: float) -> tuple[dict[str, Any] | None, str]:
        row, err = self.launcher.run(task, timeout)
        if row is None and self.launcher.fork and ("fork" in err.lower() or "template" in err.lower()):
            self.log(f"  forked worker failed ({err[:120]}); retrying in a new interpreter")
            self.launcher.close()
            self.launcher = Launcher(self.env, fork=False)
            row, err = self.launcher.run(task, timeout)
        return row, err

    def close(self) -> None:
        self.launcher.close()


def _status(err: str) -> str:
    if "out of memory" in err.lower() or "MemoryCapExceeded" in err:
        return "did not fit"
    return f"failed: {err}"[:300]


def memory_sweep(setup: Setup, runner: Runner, ks: Sequence[int], *, device: str, b: int, batch: int,
                 heldout: int, inner: int, soup_options: dict[str, Any], time_left: Callable[[], float],
                 threads: int | None, seed: int = 0, log=print) -> list[dict[str, Any]]:
    """Part 2: one row per (method, K), K ascending and both methods at each K (so that the ratio at the largest
    K is the last thing the budget could cut); the planner's prediction in every row, measured or not."""
    rows: list[dict[str, Any]] = []
    seconds: dict[str, list[tuple[int, float]]] = {m: [] for m in MEMORY_METHODS}
    for k in sorted(ks):
        for method in MEMORY_METHODS:
            bk = min(b, k)
            p = setup.predict(method, k, bk, batch, device, soup_options)
            row: dict[str, Any] = {"method": method, "K": k, "b": bk if method.startswith("mehl") else k,
                                   "batch_size": batch, "heldout_images": heldout, "inner_iterations": inner,
                                   "predicted_bytes": p.peak_bytes, "predicted_gib": p.peak_bytes / 2**30,
                                   "formula": p.formula, "checkpoint_dtype": setup.file_dtype}
            expected = _expected_seconds(seconds[method], k)
            left = time_left()
            if expected is not None and expected > left:
                rows.append({**row, "status": f"not run: expected {expected:.0f} s > {left:.0f} s left of the budget"})
                log(f"  {method:9s} K={k:3d}: NOT RUN (budget: expected {expected:.0f} s, {left:.0f} s left); "
                    f"planner {p.peak_bytes / 2**30:.2f} GiB")
                continue
            task = {"kind": "soup", "method": method, "k": k, "paths": [str(q) for q in setup.paths],
                    "arch": setup.arch, "num_classes": setup.num_classes, "device": device, "b": bk,
                    "inner_iterations": inner, "heldout_images": heldout, "batch_size": batch, "seed": seed,
                    "soup_options": soup_options, "cast_checkpoints": setup.cast, "threads": threads}
            t0 = time.perf_counter()
            got, err = runner.run(task, max(1.0, left))
            wall = time.perf_counter() - t0
            seconds[method].append((k, wall))
            if got is None:
                rows.append({**row, "status": _status(err), "wall_seconds": wall})
                log(f"  {method:9s} K={k:3d}: {_status(err)[:160]}; planner {p.peak_bytes / 2**30:.2f} GiB")
                continue
            measured = got["peak_memory_bytes"]
            rows.append({**row, "status": "ok", "peak_memory_bytes": measured, "peak_memory_gib": measured / 2**30,
                         "predicted_over_measured": p.peak_bytes / measured if measured else None,
                         "within_plan_tol": abs(p.peak_bytes / measured - 1) <= PLAN_TOL if measured else False,
                         "seconds_total": got["seconds_total"], "seconds_per_epoch": got["seconds_per_epoch"],
                         "epochs": got["epochs"], "outer_iterations": got["outer_iterations"],
                         "memory_source": got["memory_source"], "wall_seconds": wall,
                         "device_name": got.get("device_name"), "torch_version": got.get("torch_version")})
            log(f"  {method:9s} K={k:3d}: peak {measured / 2**30:7.2f} GiB measured, {p.peak_bytes / 2**30:7.2f} GiB "
                f"planner (x{p.peak_bytes / measured:.2f})  {got['seconds_per_epoch']:.2f} s/epoch  ({wall:.0f} s)")
    return rows


def _expected_seconds(done: list[tuple[int, float]], k: int) -> float | None:
    """Wall time of the next run of a method from its earlier ones (proportional to K: reading dominates)."""
    if not done:
        return None
    k0, s0 = done[-1]
    return s0 * max(1.0, k / k0)


def memory_checks(rows: list[dict[str, Any]], ks: Sequence[int], b: int) -> dict[str, dict[str, Any]]:
    """PASS/FAIL of part 2: every run done (or 'did not fit'), planner within 15 %, MEHL+ flat, the ratio."""
    by = {(r["method"], r["K"]): r for r in rows}
    undone = [f"{m} K={k}: {r['status']}" for (m, k), r in by.items() if r["status"] not in ("ok", "did not fit")]
    measured = [r for r in rows if r["status"] == "ok"]
    outside = [f"{r['method']} K={r['K']} (x{r['predicted_over_measured']:.2f})" for r in measured
               if not r["within_plan_tol"]]
    same_b = [r["peak_memory_bytes"] for r in measured if r["method"] == "mehl+" and r["b"] == b]
    flat = (max(same_b) / min(same_b) - 1) if len(same_b) >= 2 else None
    kmax = max(ks)
    lr, mh = by.get(("learned+", kmax), {}), by.get(("mehl+", kmax), {})
    checks = {
        "part2_runs": {"result": "FAIL" if undone or not measured else "PASS", "not_done": undone},
        "part2_planner": {"result": "FAIL" if outside or not measured else "PASS", "tolerance": PLAN_TOL,
                          "how": "|predicted / measured - 1| <= tolerance for every measured (method, K)",
                          "outside": outside},
        "part2_mehl_flat": {"result": ("PASS" if flat <= FLAT_TOL else "FAIL") if flat is not None else
                            "NOT MEASURED", "value": flat, "tolerance": FLAT_TOL,
                            "how": f"max / min - 1 of MEHL-Soup+ peaks over the K with b = {b}"},
    }
    ratio: dict[str, Any] = {"K": kmax, "how": "measured at this K (not extrapolated)",
                             "predicted": (lr.get("predicted_bytes", 0) / mh["predicted_bytes"])
                             if mh.get("predicted_bytes") else None}
    if lr.get("status") == "ok" and mh.get("status") == "ok":
        ratio.update(result="MEASURED", value=lr["peak_memory_bytes"] / mh["peak_memory_bytes"])
    elif lr.get("status") == "did not fit" and mh.get("status") == "ok":
        ratio.update(result="MEASURED (Learned-Soup+ did not fit)", value=None,
                     how="Learned-Soup+ ran out of device memory; the planner's peak stands beside it")
    else:
        ratio.update(result="NOT MEASURED", value=None)
    checks["part2_ratio_at_largest_K"] = ratio
    return checks


def step_ratio(setup: Setup, runner: Runner, *, device: str, b: int, batch: int, warmup: int, pairs: int,
               soup_options: dict[str, Any], timeout: float, threads: int | None, seed: int = 0,
               log=print) -> dict[str, Any]:
    """Part 3: ``memory_time_steps.time_steps`` in a fresh process (the steps alternate, median pair ratio)."""
    task = {"kind": "steps", "paths": [str(q) for q in setup.paths], "arch": setup.arch,
            "num_classes": setup.num_classes, "device": device, "b": b, "batch_size": batch, "warmup": warmup,
            "pairs": pairs, "seed": seed, "soup_options": soup_options, "cast_checkpoints": setup.cast,
            "threads": threads}
    got, err = runner.run(task, timeout)
    if got is None:
        log(f"  step timing FAILED: {err}")
        return {"status": _status(err)}
    log(f"  MEHL-Soup+ inner step {got['mehl_step_seconds'] * 1e3:.1f} ms, plain step "
        f"{got['plain_step_seconds'] * 1e3:.1f} ms: median pair ratio {got['step_ratio']:.3f} (b = {b}, "
        f"batch {batch}, {pairs} pairs)")
    return {"status": "ok", **got}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Peak memory against K of each method: measured (filled) and the planner's prediction (open) beside it."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from soupkit.experiments.plots import method_style  # noqa: PLC0415
    from soupkit.methods.registry import display_name  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in MEMORY_METHODS:
        style = method_style(m)
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["K"])
        ok = [r for r in mine if r["status"] == "ok"]
        if ok:
            ax.plot([r["K"] for r in ok], [r["peak_memory_gib"] for r in ok], "-", marker=style["marker"],
                    color=style["color"], label=f"{display_name(m)} measured")
        beside = [r["K"] * 1.04 for r in mine]  # a little to the right, so that neither marker hides the other
        ax.plot(beside, [r["predicted_gib"] for r in mine], ":", marker=style["marker"],
                mfc="none", color=style["color"], label=f"{display_name(m)} planner")
        for r, x in zip(mine, beside):
            if r["status"] != "ok":
                ax.annotate(r["status"].split(":")[0], (x, r["predicted_gib"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4), color=style["color"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["K"] for r in rows}), [str(k) for k in sorted({r["K"] for r in rows})])
    ax.set_xlabel("K (models in the pool)")
    ax.set_ylabel("peak memory above start (GiB)")
    ax.set_title(title, fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_runner(device: str, fork: bool, log=print) -> Runner:
    """CPU: the memory benchmark's live-malloc setting, so RSS follows the live tensors; CUDA: nothing to set."""
    return Runner(MALLOC_ENV["live"] if torch.device(device).type == "cpu" else {}, fork, log)
