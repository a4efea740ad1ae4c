"""(a) peak memory and (c) seconds per epoch of ``make_soup("learned+" | "hl+" | "mehl+")``, one soup per fresh process.

``run_soup`` makes one soup and returns its result row (the core's ``stats["peak_memory_bytes"]`` and
``stats["seconds_per_epoch"]``); ``run_sweep`` runs it for every (method, K) in a fresh process of a
``Launcher``, growing K until a method's projected memory passes the cap; ``merge`` joins the memory runs with
the time runs of the same (method, K).
"""
from __future__ import annotations

import gc
import math
import os
from pathlib import Path
from typing import Any, Sequence

# _bench_common first: it imports soupkit, which pins the CPU numerics before torch is imported
from _bench_common import CSV_COLUMNS, _malloc_state, build_model, environment, heldout, image_size, state_bytes
from _bench_launcher import Launcher

import torch  # noqa: E402

from soupkit import CheckpointPool, make_soup  # noqa: E402
from soupkit.runtime.memory import current_rss_bytes  # noqa: E402


# ---- (a) + (c): one soup, measured by the core ------------------------------------------------------------------
def run_soup(method: str, k: int, paths: Sequence[str | Path], *, arch: str, num_classes: int, device: str,
             b: int, inner_iterations: int, heldout_images: int, batch_size: int, seed: int = 0,
             outer_iterations: int | None = None, soup_options: dict[str, Any] | None = None,
             cast_checkpoints: bool = False) -> dict[str, Any]:
    """``make_soup(method)`` on the first ``k`` checkpoints; one result row (call it in a fresh process).

    ``outer_iterations`` (MEHL only) stops after that many blocks of b models instead of one pass over K;
    ``soup_options`` are further ``make_soup`` options (``--soup-option``); ``cast_checkpoints``: the files are
    in another floating dtype than the model (e.g. float16) and are cast to float32 when read.
    """
    model = build_model(arch, num_classes, seed).to(device)
    pool = CheckpointPool([str(p) for p in paths[:k]], cast_dtype=torch.float32 if cast_checkpoints else None)
    loader = heldout(heldout_images, batch_size, image_size(model), num_classes, seed)
    options: dict[str, Any] = {"device": device, "inner_iterations": inner_iterations, "progress": False,
                               "seed": seed, **(soup_options or {})}
    if method.startswith("mehl"):
        options["model_batch_size"] = b
        if outer_iterations:
            options["outer_iterations"] = min(outer_iterations, math.ceil(k / b))
    gc.collect()
    start_rss = current_rss_bytes()
    result = make_soup(method, model, pool, loader, **options)
    stats = result.stats
    mbytes = state_bytes(model)
    return {
        "method": method, "K": k, "model_batch_size": stats.get("model_batch_size"), "status": "ok",
        "peak_memory_bytes": int(stats["peak_memory_bytes"]),
        "peak_memory_gib": stats["peak_memory_bytes"] / 2**30,
        "peak_in_models": stats["peak_memory_bytes"] / mbytes, "memory_source": stats["memory_source"],
        "malloc": _malloc_state(device), "start_rss_bytes": start_rss, "seconds_total": stats["seconds_total"],
        "seconds_per_epoch": stats["seconds_per_epoch"], "epochs": stats["epochs"],
        "inner_iterations": stats["inner_iterations"], "outer_iterations": stats["outer_iterations"],
        "max_resident_models": pool.max_resident, "heldout_images": heldout_images, "batch_size": batch_size,
        "arch": arch, "num_classes": num_classes, "num_parameters": sum(p.numel() for p in model.parameters()),
        "model_bytes": mbytes, "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "pid": os.getpid(),
        **{k_: v for k_, v in environment(device).items() if k_ in CSV_COLUMNS},
    }


def _project(points: list[tuple[int, int]], k: int) -> float:
    """Peak bytes at ``k`` from the measured (K, bytes): a line through the last two, else proportional."""
    if len(points) >= 2:
        (k1, m1), (k2, m2) = points[-2], points[-1]
        slope = max(0.0, (m2 - m1) / (k2 - k1))
        return m2 + slope * (k - k2)
    k1, m1 = points[-1]
    return m1 * k / k1


def run_sweep(paths: Sequence[Path], methods: Sequence[str], ks: Sequence[int] | dict[str, list[int]], *,
              cap_bytes: int, launcher: Launcher | None, timeout: float | None = None,
              mehl_blocks: int | None = None, threads: int | None = None, log=print,
              **common: Any) -> list[dict[str, Any]]:
    """One row per (method, K), K ascending per method, each in a fresh process of ``launcher`` (None: in this
    process, for tests only).

    K stops growing for a method when its projected peak (plus the process's start RSS on CPU) passes
    ``cap_bytes``, or after a failed run. ``ks`` may be a dict {method: [K...]} to run given K only.
    """
    rows: list[dict[str, Any]] = []
    for method in methods:
        points: list[tuple[int, int]] = []
        start_rss = 0
        for k in sorted(ks[method] if isinstance(ks, dict) else ks):
            if points:
                projected = _project(points, k) + start_rss
                if projected > cap_bytes:
                    log(f"  {method:9s} K={k:3d}: skipped, projected {projected / 2**30:.1f} GiB > cap "
                        f"{cap_bytes / 2**30:.1f} GiB")
                    rows.append({"method": method, "K": k, "status": "skipped (projected over cap)"})
                    break
            task = {"kind": "soup", "method": method, "k": k, "paths": [str(p) for p in paths], **common,
                    "outer_iterations": mehl_blocks if method.startswith("mehl") else None}
            if launcher is not None:
                row, err = launcher.run({**task, "threads": threads}, timeout)
            else:
                task.pop("kind")
                row, err = run_soup(**task), ""
            if row is None:
                log(f"  {method:9s} K={k:3d}: FAILED ({err})")
                rows.append({"method": method, "K": k, "status": f"failed: {err}"[:300]})
                break
            rows.append(row)
            points.append((k, row["peak_memory_bytes"]))
            start_rss = row["start_rss_bytes"] if torch.device(row["device"]).type == "cpu" else 0
            log(f"  {method:9s} K={k:3d}: peak {row['peak_memory_gib']:6.2f} GiB ({row['peak_in_models']:5.2f} "
                f"models)  {row['seconds_total']:6.1f} s total, {row['seconds_per_epoch']:6.2f} s/epoch  "
                f"({row['epochs']:.0f} epochs, {row['outer_iterations']} blocks, load {row['loadavg_1min']:.1f})")
    return rows


def merge(memory_rows: list[dict[str, Any]], time_rows: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Memory from the memory run, seconds and epochs from the time run (same method and K), in one row each."""
    if time_rows is None:
        return [{**r, "memory_run_blocks": r.get("outer_iterations")} for r in memory_rows]
    timed = {(r["method"], r["K"]): r for r in time_rows}
    out = []
    for r in memory_rows:
        t = timed.get((r["method"], r["K"]))
        row = {**r, "memory_run_blocks": r.get("outer_iterations")}
        if r.get("status") == "ok":
            row["time_status"] = t.get("status", "missing") if t else "missing"
            if row["time_status"] != "ok":
                row.update(seconds_total=None, seconds_per_epoch=None, epochs=None, outer_iterations=None)
            else:
                row.update({key: t[key] for key in ("seconds_total", "seconds_per_epoch", "epochs", "inner_iterations",
                                                    "outer_iterations", "threads")})
                row["peak_memory_bytes_default_malloc"] = t["peak_memory_bytes"]
                row["loadavg_1min"] = t["loadavg_1min"]
        out.append(row)
    return out
