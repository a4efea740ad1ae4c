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

The model: open_clip's ``ViT-B-32`` vision tower with QuickGELU (OpenAI CLIP ViT-B/32 as in model-soups, 87.8 M
parameters) with random weights, L2-normalised features and a linear head over 1000 classes (ImageNet's, as the
model-soups checkpoints): 88.4 M parameters, 337 MiB in fp32. The K "fine-tunes" are the base plus seeded
Gaussian noise (``--noise`` x each tensor's std), written as safetensors and read through
``soupkit.CheckpointPool``. The held-out set is random 224 px images with random labels: only memory and time
are measured, never accuracy.

Targets (printed PASS/MISS; nothing is tuned to pass):

* MEHL-Soup+ peak memory flat in K: (max / min - 1) <= 10 % over the measured K >= 8;
* Learned-Soup+ / MEHL-Soup+ peak memory >= 13 at K = 72 (from a least-squares line through each method's
  measured points when K = 72 was not measured; then labelled EXTRAPOLATED);
* MEHL-Soup+ inner step <= 1.2 x plain training step.

Usage (add ``--publish`` to copy the CSV and the figure to data/results/ and figures/)::

    python benchmarks/memory_time.py --device cpu --ks 2 4 8 16 32 --out outputs/benchmarks --publish
    python benchmarks/memory_time.py --device cuda --ks 2 4 8 16 32 48 72 --b 18 --batch 128 --heldout 256 \
        --step-batch 128 --threads 0 --out outputs/benchmarks --publish

Outputs under ``--out``: ``benchmark_<device>.csv`` (one row per method x K), ``steps_<device>.csv`` (every timed
step), ``summary_<device>.json`` (ratios, fits, targets, environment), ``benchmark_memory_vs_k_<device>.png``.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

try:
    import soupkit  # noqa: F401
except ImportError:  # run from a checkout without an editable install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import save_file

from soupkit import CheckpointPool, make_soup
from soupkit.runtime._compat import import_open_clip
from soupkit.runtime.memory import current_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("learned+", "hl+", "mehl+")
TARGET_K = 72
TARGET_MEMORY_RATIO = 13.0
TARGET_FLAT = 0.10
TARGET_STEP_RATIO = 1.2
CSV_COLUMNS = [
    "method", "K", "model_batch_size", "status", "peak_memory_bytes", "peak_memory_gib", "peak_in_models",
    "memory_source", "malloc", "start_rss_bytes", "memory_run_blocks", "max_resident_models",
    "peak_memory_bytes_default_malloc", "time_status", "seconds_total", "seconds_per_epoch", "epochs",
    "inner_iterations", "outer_iterations", "heldout_images", "batch_size", "arch", "num_classes", "num_parameters",
    "model_bytes", "device", "device_name", "torch_version", "open_clip_version", "threads", "loadavg_1min",
]

# glibc's dynamic mmap threshold lets freed tensors stay in fragmented heap arenas, so the CPU peak RSS of the
# same run varied by 50 % here (Learned-Soup+ K = 4: 6.6 to 9.9 models' worth over 5 runs). A fixed threshold
# returns every tensor >= 128 KiB to the OS when freed: the RSS then follows the live tensors (what
# torch.cuda.max_memory_allocated reports on a GPU) and repeats to 0.1 %. Set for the memory workers on CPU only.
# glibc.malloc.hugetlb=1 backs those mappings with transparent huge pages: fewer page faults, same peaks.
MALLOC_ENV = {"live": {"MALLOC_MMAP_THRESHOLD_": "131072", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
              "default": {}}

# a tiny architecture for the smoke test (same code path: open_clip vision tower + linear head)
TINY_VISION = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 4.0}
TINY_EMBED = 16


# ---- model, checkpoints, data --------------------------------------------------------------------------------
class Classifier(nn.Module):
    """``head(normalize(visual(x)))``: an open_clip vision tower and a linear head (as model-soups' wrapper)."""

    def __init__(self, visual: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(nn.functional.normalize(self.visual(x), dim=-1))


def build_model(arch: str = "ViT-B-32", num_classes: int = 1000, seed: int = 0) -> Classifier:
    """``arch``: an open_clip model name (its vision tower is built, with QuickGELU) or ``"tiny"``."""
    open_clip = import_open_clip()
    from open_clip.model import _build_vision_tower  # noqa: PLC0415  (the factory open_clip uses itself)

    if arch == "tiny":
        embed_dim, vision_cfg = TINY_EMBED, dict(TINY_VISION)
    else:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(f"unknown open_clip architecture {arch!r}")
        embed_dim, vision_cfg = cfg["embed_dim"], dict(cfg["vision_cfg"])
    torch.manual_seed(seed)
    visual = _build_vision_tower(embed_dim, vision_cfg, quick_gelu=True)
    return Classifier(visual, embed_dim, num_classes)


def image_size(model: Classifier) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def make_checkpoints(model: nn.Module, k: int, directory: Path, seed: int = 0, noise: float = 1e-3) -> list[Path]:
    """K synthetic fine-tunes ``base + noise * std(tensor) * N(0, 1)`` (seeded per model) as safetensors.

    Files of an earlier run with the same manifest are reused.
    """
    directory.mkdir(parents=True, exist_ok=True)
    base = {k_: v.detach().cpu() for k_, v in model.state_dict().items()}
    manifest = {"keys": len(base), "numel": sum(v.numel() for v in base.values()), "seed": seed, "noise": noise,
                "base_checksum": float(sum(v.double().sum() for v in base.values() if v.is_floating_point()))}
    paths = [directory / f"model_{i:03d}.safetensors" for i in range(k)]
    meta = directory / "manifest.json"
    if meta.exists() and json.loads(meta.read_text()).get("config") == manifest and all(p.exists() for p in paths):
        return paths
    for p in directory.glob("model_*.safetensors"):
        p.unlink()
    meta.unlink(missing_ok=True)
    stds = {key: (v.float().std().item() if v.numel() > 1 else abs(v.item())) or 1.0
            for key, v in base.items() if v.is_floating_point()}
    for i, path in enumerate(paths):
        gen = torch.Generator().manual_seed(seed * 100_003 + i + 1)
        state = {key: (torch.randn(v.shape, generator=gen, dtype=v.dtype).mul_(noise * stds[key]).add_(v)
                       if v.is_floating_point() else v.clone()).contiguous()
                 for key, v in base.items()}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)
        del state
    meta.write_text(json.dumps({"config": manifest, "n": k}))
    return paths


def heldout(n: int, batch: int, size: int, num_classes: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``n`` random images ``[3, size, size]`` with random labels, in batches (a re-iterable list)."""
    gen = torch.Generator().manual_seed(seed + 12345)
    x = torch.randn(n, 3, size, size, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


# ---- environment ---------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def environment(device: str) -> dict[str, Any]:
    open_clip = import_open_clip()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"device": str(device), "device_name": device_name(device), "torch_version": torch.__version__,
            "open_clip_version": open_clip.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "loadavg_1_5_15": load}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _malloc_state(device: str) -> str:
    if torch.device(device).type == "cuda":
        return "cuda caching allocator"
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return f"live (MALLOC_MMAP_THRESHOLD_={threshold})" if threshold else "default"


def default_cap_bytes(device: str) -> int:
    """75 % of physical memory (CPU) or 90 % of the GPU's memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(dev).total_memory)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(0.75 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 16 * 2**30


# ---- (a) + (c): one soup, measured by the core ------------------------------------------------------------------
def run_soup(method: str, k: int, paths: Sequence[str | Path], *, arch: str, num_classes: int, device: str,
             b: int, inner_iterations: int, heldout_images: int, batch_size: int, seed: int = 0,
             outer_iterations: int | None = None, soup_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``make_soup(method)`` on the first ``k`` checkpoints; one result row (call it in a fresh process).

    ``outer_iterations`` (MEHL only) stops after that many blocks of b models instead of one pass over K;
    ``soup_options`` are further ``make_soup`` options (``--soup-option``).
    """
    model = build_model(arch, num_classes, seed).to(device)
    pool = CheckpointPool([str(p) for p in paths[:k]])
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


# ---- (b): MEHL-Soup+ inner step vs plain training step ----------------------------------------------------------
def _mehl_space(model: nn.Module, paths: Sequence[str | Path], b: int, device: str, cfg: Any):
    """The HyperplaneSpace that ``make_soup("mehl+")`` builds for its first block (no recentring; ``cfg``'s
    clip, direction dtype and autocast)."""
    from soupkit.engine.layers import layer_map  # noqa: PLC0415
    from soupkit.engine.loop import HyperplaneSpace  # noqa: PLC0415

    pool = CheckpointPool([str(p) for p in paths[:b]])
    layers = layer_map(model, True)
    centre = pool.center(device, torch.float32)
    centre = {key: centre[key] for key in layers.forward_keys}
    soup = {key: v.clone() for key, v in centre.items()}
    ddtype = getattr(cfg, "direction_dtype", None) or torch.float32
    stack = pool.load_stack(list(range(b)), device, ddtype, subtract=centre, keys=list(layers.mixed))
    w0 = torch.zeros(b, len(layers), device=device)
    extra = {"autocast": cfg.autocast_dtype} if getattr(cfg, "autocast", None) else {}
    return HyperplaneSpace(model, soup, stack, layers, w0, None, cfg.clip_grad_norm, **extra), w0


def time_steps(paths: Sequence[str | Path], *, arch: str, num_classes: int, device: str, b: int, batch_size: int,
               warmup: int = 1, pairs: int = 6, seed: int = 0,
               soup_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Seconds of one MEHL-Soup+ inner step and of one plain training step, paired and alternating.

    MEHL step: ``soupkit.engine.loop.optimise`` for one step over the b-model HyperplaneSpace that make_soup builds
    (move the soup, forward, gradient w.r.t. the soup, b inner products per tensor, AdamW on the [b, L]
    coefficients; the optimiser set-up of each call is included). Plain step: forward + backward + AdamW on the
    model's own parameters (one optimiser kept across steps). Same model, same batch, same process. The two
    alternate (M P, P M, M P, ...) so that both see the same load on a shared machine; ``warmup`` pairs are
    dropped. ``step_ratio`` is the median over pairs of mehl/plain.
    """
    from soupkit.methods.registry import config_for  # noqa: PLC0415
    from soupkit.engine.batches import BatchStream
    from soupkit.engine.loop import optimise  # noqa: PLC0415

    model = build_model(arch, num_classes, seed).to(device)
    x, y = heldout(batch_size, batch_size, image_size(model), num_classes, seed)[0]
    loader = [(x, y)]  # every step sees this one batch
    cfg = config_for("mehl+", device=device, progress=False, **(soup_options or {}))
    space, w = _mehl_space(model, paths, b, device, cfg)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    plain_batches = BatchStream(loader, device)
    model.eval()  # as optimise(); the ViT has no dropout or batch norm, so train() would compute the same

    def mehl_step() -> float:
        nonlocal w
        for p in params:
            p.requires_grad_(False)  # the soup runs through functional_call; the module's weights are unused
        _sync(device)
        t0 = time.perf_counter()
        w = optimise(space, w, BatchStream(loader, device), 1, cfg, [])  # its loss.item() synchronises
        return time.perf_counter() - t0

    def plain_step() -> float:
        for p in params:
            p.requires_grad_(True)
        _sync(device)
        t0 = time.perf_counter()
        xb, yb = plain_batches.next()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        loss.item()  # synchronises, as optimise's history does
        return time.perf_counter() - t0

    rows: list[dict[str, Any]] = []
    for i in range(warmup + pairs):
        order = ("mehl+", "plain") if i % 2 == 0 else ("plain", "mehl+")
        got = {kind: (mehl_step if kind == "mehl+" else plain_step)() for kind in order}
        rows += [{"pair": i, "kind": kind, "seconds": got[kind], "warmup": i < warmup,
                  "first": kind == order[0]} for kind in ("mehl+", "plain")]
    timed = [r for r in rows if not r["warmup"]]
    mehl = [r["seconds"] for r in timed if r["kind"] == "mehl+"]
    plain = [r["seconds"] for r in timed if r["kind"] == "plain"]
    return {"mehl_step_seconds": statistics.median(mehl), "plain_step_seconds": statistics.median(plain),
            "step_ratio": statistics.median(m / p for m, p in zip(mehl, plain)),
            "ratio_of_medians": statistics.median(mehl) / statistics.median(plain),
            "mehl_step_seconds_min": min(mehl), "plain_step_seconds_min": min(plain),
            "model_batch_size": b, "batch_size": batch_size, "warmup_pairs": warmup, "pairs": pairs,
            "rows": rows, **environment(device)}


# ---- fresh processes -----------------------------------------------------------------------------------------------
def _spawn(task: dict[str, Any], timeout: float | None,
           env: dict[str, str] | None = None) -> tuple[dict[str, Any] | None, str]:
    """Run ``task`` in a new interpreter (``env`` added to the environment); returns (result or None, error)."""
    with tempfile.TemporaryDirectory(prefix="soupkit-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", json.dumps(task), str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return None, f"timeout after {timeout} s"
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            return None, f"rc={proc.returncode}: " + " | ".join(tail)
        return json.loads(out.read_text()), ""


class Launcher:
    """Runs each measurement in a fresh process: a fork of a template interpreter that has only imported torch,
    open_clip and soupkit.

    A forked child is a new process with its own address space, allocator state and RSS high-water mark; it
    starts from the template's state, which is an interpreter after its imports and nothing else (no model,
    no tensor work, no CUDA context), i.e. what a new interpreter reaches before the measurement starts. The
    imports (~6 s on a loaded 2-core machine) are thus paid once per environment, not once per run. Without
    ``os.fork`` (or with ``fork=False``) every run starts a new interpreter instead.
    """

    def __init__(self, env: dict[str, str] | None = None, fork: bool = True) -> None:
        self.env = {**os.environ, **(env or {})}
        self.fork = fork and hasattr(os, "fork")
        self.proc: subprocess.Popen | None = None
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        self._err = tempfile.TemporaryFile(mode="w+")

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_template"], cwd=str(ROOT),
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, bufsize=1)
        self._lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self._lines), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen, lines: "queue.Queue[str | None]") -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    def _next(self, timeout: float | None) -> dict[str, Any] | None:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return None
        return json.loads(line) if line else {"rc": "template exited"}

    def _error_tail(self, offset: int) -> str:
        self._err.seek(offset)
        lines = self._err.read().strip().splitlines()[-3:]
        self._err.seek(0, os.SEEK_END)
        return " | ".join(lines)

    def run(self, task: dict[str, Any], timeout: float | None = None) -> tuple[dict[str, Any] | None, str]:
        """Result of ``task`` (see ``_worker``) or (None, why it failed)."""
        if not self.fork:
            return _spawn(task, timeout, self.env)
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self._err.seek(0, os.SEEK_END)
        offset = self._err.tell()
        with tempfile.TemporaryDirectory(prefix="soupkit-bench-") as tmp:
            out = Path(tmp) / "result.json"
            self.proc.stdin.write(json.dumps([json.dumps(task), str(out)]) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            started = self._next(600)
            if not started or "pid" not in started:
                self.close()
                return None, f"template failed: {self._error_tail(offset)}"
            done = self._next(timeout)
            if done is None:  # ran past the timeout: kill that child only
                os.kill(started["pid"], signal.SIGKILL)
                self._next(60)
                return None, f"timeout after {timeout} s"
            if done.get("rc") != 0 or not out.exists():
                return None, f"rc={done.get('rc')}: {self._error_tail(offset)}"
            return json.loads(out.read_text()), ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        self._err.close()


def _template() -> None:
    """Import everything a worker needs, then fork one child per task read from stdin (see ``Launcher``)."""
    import_open_clip()
    import soupkit.config, soupkit.engine.layers, soupkit.engine.loop  # noqa: E401, F401, PLC0415
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a child prints goes to stderr, not into the protocol
    for line in sys.stdin:
        task_json, out = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _worker(task_json, out)
                code = 0
            except BaseException:  # noqa: BLE001  (reported through stderr and the exit code)
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        proto.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        proto.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")


def _worker(task_json: str, out: str) -> None:
    task = json.loads(task_json)
    _set_threads(task.pop("threads", None))
    kind = task.pop("kind")
    result = run_soup(**task) if kind == "soup" else time_steps(**task)
    Path(out).write_text(json.dumps(result))


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


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


# ---- analysis ----------------------------------------------------------------------------------------------------
def linear_fit(points: Sequence[tuple[float, float]]) -> dict[str, float] | None:
    """Least squares ``y = a + s x``; None with fewer than 2 distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return {"intercept": my - slope * mx, "slope": slope}


def _value_at(fit: dict[str, float], k: float) -> float:
    return fit["intercept"] + fit["slope"] * k


def analyse(rows: list[dict[str, Any]], steps: dict[str, Any] | None) -> dict[str, Any]:
    """Ratios, fits and the three targets from the merged rows and the step timing."""
    ok = [r for r in rows if r.get("status") == "ok"]
    peak = {(r["method"], r["K"]): r["peak_memory_bytes"] for r in ok}
    per_epoch = {(r["method"], r["K"]): r["seconds_per_epoch"] for r in ok if r.get("seconds_per_epoch")}
    default_peak = {(r["method"], r["K"]): r["peak_memory_bytes_default_malloc"] for r in ok
                    if r.get("peak_memory_bytes_default_malloc")}
    by_method = {m: sorted((k, v) for (mm, k), v in peak.items() if mm == m) for m in METHODS}
    fits = {m: linear_fit(pts) for m, pts in by_method.items()}
    model_bytes = next((r["model_bytes"] for r in ok if r.get("model_bytes")), None)

    def ratios(table: dict, num: str, den: str = "mehl+") -> dict[str, float]:
        ks = sorted({k for m, k in table if m == num} & {k for m, k in table if m == den})
        return {str(k): table[(num, k)] / table[(den, k)] for k in ks}

    out: dict[str, Any] = {
        "memory_fit_bytes": {m: f for m, f in fits.items() if f is not None},
        "memory_fit_models": ({m: {"intercept": f["intercept"] / model_bytes, "slope": f["slope"] / model_bytes}
                               for m, f in fits.items() if f is not None} if model_bytes else {}),
        "memory_ratio_learned_over_mehl": ratios(peak, "learned+"),
        "memory_ratio_hl_over_mehl": ratios(peak, "hl+"),
        "memory_ratio_learned_over_mehl_default_malloc": ratios(default_peak, "learned+"),
        "seconds_per_epoch": {m: {str(k): v for (mm, k), v in sorted(per_epoch.items()) if mm == m} for m in METHODS},
        "seconds_per_epoch_ratio_learned_over_mehl": ratios(per_epoch, "learned+"),
        "seconds_per_epoch_ratio_hl_over_mehl": ratios(per_epoch, "hl+"),
        "targets": {},
    }
    out["growth"] = {m: {"K_range": [pts[0][0], pts[-1][0]], "peak_ratio_last_over_first": pts[-1][1] / pts[0][1],
                         "bytes_per_extra_model": fits[m]["slope"] if fits[m] else None}
                     for m, pts in by_method.items() if len(pts) >= 2}

    targets = out["targets"]
    mehl = [(k, v) for k, v in by_method["mehl+"] if k >= 8]
    if len(mehl) >= 2:
        values = [v for _, v in mehl]
        spread = max(values) / min(values) - 1
        targets["mehl_flat"] = {"target": f"(max/min - 1) of MEHL+ peak over K in {[k for k, _ in mehl]} "
                                          f"<= {TARGET_FLAT:.0%}",
                                "value": spread, "change_K8_to_Kmax": values[-1] / values[0] - 1,
                                "result": "PASS" if spread <= TARGET_FLAT else "MISS"}
    else:
        targets["mehl_flat"] = {"target": "MEHL+ flat from K = 8", "result": "NOT MEASURED (need 2 K >= 8)"}

    ratio = None
    if ("learned+", TARGET_K) in peak and ("mehl+", TARGET_K) in peak:
        learned72, mehl72, how = peak[("learned+", TARGET_K)], peak[("mehl+", TARGET_K)], "measured"
        ratio = learned72 / mehl72
    elif fits["learned+"] and fits["mehl+"]:
        learned72, mehl72 = _value_at(fits["learned+"], TARGET_K), _value_at(fits["mehl+"], TARGET_K)
        ratio = learned72 / mehl72
        how = (f"EXTRAPOLATED to K = {TARGET_K} from least-squares lines through the measured K = "
               f"{[k for k, _ in by_method['learned+']]} (learned+) and {[k for k, _ in by_method['mehl+']]} (mehl+)")
    if ratio is None:
        targets["memory_ratio_K72"] = {"target": f">= {TARGET_MEMORY_RATIO}", "result": "NOT MEASURED"}
    else:
        targets["memory_ratio_K72"] = {"target": f"learned+/mehl+ peak at K = {TARGET_K} >= {TARGET_MEMORY_RATIO}",
                                       "value": ratio, "how": how, "learned_bytes": learned72, "mehl_bytes": mehl72,
                                       "result": ("PASS" if ratio >= TARGET_MEMORY_RATIO else "MISS")
                                       + (" (extrapolated)" if how != "measured" else "")}
    if steps is not None:
        targets["step_ratio"] = {"target": f"mehl+ inner step / plain step <= {TARGET_STEP_RATIO} "
                                           "(median over alternating pairs)",
                                 "value": steps["step_ratio"], "ratio_of_medians": steps["ratio_of_medians"],
                                 "mehl_step_seconds": steps["mehl_step_seconds"],
                                 "plain_step_seconds": steps["plain_step_seconds"],
                                 "result": "PASS" if steps["step_ratio"] <= TARGET_STEP_RATIO else "MISS"}
    else:
        targets["step_ratio"] = {"target": f"<= {TARGET_STEP_RATIO}", "result": "NOT MEASURED"}
    return out


def write_csv(rows: list[dict[str, Any]], path: Path, columns: Sequence[str] = CSV_COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path, title: str) -> Path:
    """Left: peak memory vs K (log-log) with the linear fits extended to K = 72; right: seconds per epoch.

    Colours from soupkit's one palette (:func:`soupkit.experiments.plots.method_colour`, as every other figure); one legend
    under both panels (it hides no point) and the notes wrapped inside their frames."""
    import textwrap  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415

    from soupkit.experiments.plots import device_title, legend_below, method_style  # noqa: PLC0415

    ok = [r for r in rows if r.get("status") == "ok"]
    labels = {"learned+": "Learned-Soup+", "hl+": "HL-Soup+", "mehl+": "MEHL-Soup+"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    kmax = max([r["K"] for r in ok] + [2])
    fits = summary.get("memory_fit_bytes", {})
    handles, extrapolated = [], False
    for m in METHODS:
        style = method_style(m)
        colour, marker = style["color"], style["marker"]
        pts = sorted((r["K"], r["peak_memory_bytes"] / 2**30) for r in ok if r["method"] == m)
        if pts:
            ax1.plot([k for k, _ in pts], [v for _, v in pts], "-", marker=marker, color=colour, zorder=3)
            handles.append(Line2D([], [], color=colour, marker=marker, ls="-", label=labels[m]))
        if m in ("learned+", "mehl+") and m in fits and kmax < TARGET_K and pts:
            xs = [pts[-1][0], TARGET_K]
            ax1.plot(xs, [_value_at(fits[m], x) / 2**30 for x in xs], ":", color=colour)
            ax1.plot([TARGET_K], [_value_at(fits[m], TARGET_K) / 2**30], "x", color=colour, ms=8, mew=2)
            extrapolated = True
        tpts = sorted((r["K"], r["seconds_per_epoch"]) for r in ok if r["method"] == m and r.get("seconds_per_epoch"))
        if tpts:
            ax2.plot([k for k, _ in tpts], [v for _, v in tpts], "-", marker=marker, color=colour, zorder=3)
    if extrapolated:
        handles += [Line2D([], [], color="0.3", ls=":", label="least-squares line"),
                    Line2D([], [], color="0.3", marker="x", mew=2, ls="none", label=f"extrapolated to K = {TARGET_K}")]
    tgt = summary.get("targets", {}).get("memory_ratio_K72", {})
    if "value" in tgt:
        kind = "extrapolated" if "EXTRA" in tgt.get("how", "") else "measured"
        ax1.text(0.03, 0.97, f"Learned-Soup+ / MEHL-Soup+ at K = {TARGET_K} ({kind}): {tgt['value']:.1f}x",
                 transform=ax1.transAxes, va="top", fontsize=8,
                 bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    missing = [f"{labels[r['method']]} K = {r['K']}" for r in ok if not r.get("seconds_per_epoch")]
    if missing:
        note = ("no time run for " + ", ".join(missing)
                + " (projected over the memory cap with glibc's default malloc)")
        ax2.text(0.03, 0.97, textwrap.fill(note, 58), transform=ax2.transAxes, va="top", fontsize=7,
                 bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax1.set_ylabel("peak memory above start (GiB)")
    ax1.set_title("peak memory", fontsize=9)
    ax2.set_ylabel("seconds per epoch over the held-out set")
    ax2.set_title("time per epoch (incl. reading checkpoints)", fontsize=9)
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, ScalarFormatter  # noqa: PLC0415

    xticks = sorted({r["K"] for r in ok} | ({TARGET_K} if fits and kmax < TARGET_K else set()))
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(xticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(base=2))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("K (models in the pool)")
        ax.grid(True, which="major", alpha=0.3)
    # headroom above the highest point, so the notes in the upper-left corners cover no data
    for ax in (ax1, ax2):
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * (high / low) ** 0.25)
    fig.suptitle(device_title(title), fontsize=8)
    fig.tight_layout()
    legend_below(fig, handles)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_title(rows: list[dict[str, Any]]) -> str:
    """The figure title of a benchmark, from the setup columns of its CSV rows."""
    first = rows[0]
    mehl = next((r for r in rows if r.get("method") == "mehl+"), first)
    params = first.get("num_parameters")
    size = f" ({params / 1e6:.1f} M parameters)" if isinstance(params, (int, float)) else ""
    return (f"{first.get('arch')} vision tower + {first.get('num_classes')}-class head{size}, "
            f"{first.get('device_name')}, torch {first.get('torch_version')}; MEHL+ b={mehl.get('model_batch_size')}, "
            f"{first.get('inner_iterations')} inner steps per block, batch {first.get('batch_size')}")


def plot_from_csv(csv_path: Path, path: Path) -> Path:
    """Redraw the figure from a benchmark CSV (e.g. the committed data/results/benchmark_cpu.csv) without
    running the benchmark: the fits and ratios are recomputed from its rows (no step timing)."""
    rows = read_rows(csv_path)
    return plot(rows, analyse(rows, None), path, plot_title(rows))


def print_report(rows: list[dict[str, Any]], steps: dict[str, Any] | None, summary: dict[str, Any], log=print) -> None:
    ks = sorted({r["K"] for r in rows})
    log("\npeak memory above start, GiB [in models' worth] (seconds per epoch)")
    log("method    " + "".join(f"{'K=' + str(k):>25s}" for k in ks))
    for m in METHODS:
        cells = []
        for k in ks:
            r = next((r for r in rows if r["method"] == m and r["K"] == k), None)
            if r is None:
                cells.append(f"{'-':>25s}")
            elif r.get("status") != "ok":
                cells.append(f"{r['status'].split()[0]:>25s}")
            else:
                sec = f"{r['seconds_per_epoch']:6.1f}s" if r.get("seconds_per_epoch") else "     -"
                cells.append(f"{r['peak_memory_gib']:6.2f} [{r['peak_in_models']:5.2f}] ({sec})")
        log(f"{m:9s} " + "".join(cells))
    for key, what in (("memory_ratio_learned_over_mehl", "learned+/mehl+ memory"),
                      ("memory_ratio_hl_over_mehl", "hl+/mehl+ memory"),
                      ("memory_ratio_learned_over_mehl_default_malloc", "learned+/mehl+ memory, glibc default"),
                      ("seconds_per_epoch_ratio_learned_over_mehl", "learned+/mehl+ s/epoch"),
                      ("seconds_per_epoch_ratio_hl_over_mehl", "hl+/mehl+ s/epoch")):
        if summary.get(key):
            log(f"{what}: " + ", ".join(f"K={k}: {v:.2f}x" for k, v in summary[key].items()))
    for m, f in summary.get("memory_fit_models", {}).items():
        log(f"fit {m}: peak = {f['intercept']:.2f} + {f['slope']:.3f} K models' worth")
    if steps is not None:
        log(f"step (batch {steps['batch_size']}, b={steps['model_batch_size']}, {steps['pairs']} alternating pairs "
            f"after {steps['warmup_pairs']} warm-up): mehl+ median {steps['mehl_step_seconds']:.3f} s, plain median "
            f"{steps['plain_step_seconds']:.3f} s; median pair ratio {steps['step_ratio']:.3f} "
            f"(ratio of medians {steps['ratio_of_medians']:.3f})")
    log("\ntargets:")
    for name, t in summary["targets"].items():
        value = f"{t['value']:.3f}" if isinstance(t.get("value"), float) else "-"
        log(f"  {t['result']:20s} {name}: {value}  [{t['target']}]" + (f"  ({t['how']})" if "how" in t else ""))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a benchmark CSV with numbers parsed (empty cells become None)."""
    def parse(v: str) -> Any:
        if v == "":
            return None
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as fh:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


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
        _template()
    else:
        main()
