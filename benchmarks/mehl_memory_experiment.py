#!/usr/bin/env python
"""Benchmark-only experiment: where MEHL-Soup+'s peak memory goes, and what three core changes would save.

Nothing in soupkit/ is edited: each variant monkeypatches the core inside its own fresh process, then runs
``make_soup("mehl+")`` on ViT-B/32 checkpoints exactly as ``memory_time.py`` does (glibc mmap threshold fixed,
so the CPU peak RSS follows the live tensors). Variants:

* ``core``          soupkit as it is (``clip_grad_norm=None``, the default);
* ``core_clip``     soupkit as it is with ``clip_grad_norm=1`` (what the paper's released code does);
* ``scaled_clip``   ``clip_grad_norm=1`` with ``HyperplaneSpace.loss`` scaling the [b, L] gradient by the clip
                    factor instead of allocating a clipped copy of the whole soup gradient (same result:
                    <factor * g, D> = factor * <g, D>);
* ``streamed``      ``HyperplaneSpace.loss`` computing each tensor's inner products <g_k, D_{i,k}> in a
                    post-accumulate-grad hook and dropping g_k at once (the full gradient is never resident),
                    plus ``CheckpointPool.load_stack`` reading key by key from the safetensors file instead of
                    materialising each whole model next to the stack; ``clip_grad_norm=None``;
* ``streamed_clip`` the same with ``clip_grad_norm=1`` (the norm accumulates in the hooks).

    python benchmarks/mehl_memory_experiment.py --k 4 --b 2 --out outputs/benchmarks
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("soupkit_bench_memory_time", HERE / "memory_time.py")
mt = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mt
_spec.loader.exec_module(mt)

VARIANTS = {"core": None, "core_clip": 1.0, "scaled_clip": 1.0, "streamed": None, "streamed_clip": 1.0}


def _scaled_clip_loss(self, w, x, y):
    """HyperplaneSpace.loss with the clip applied to the [b, L] result instead of a copy of every gradient."""
    from soupkit.engine.loop import _cross_entropy  # noqa: PLC0415

    self.move_to(w)
    leaves = {k: self.theta[k].detach().requires_grad_(True) for k in self.layers.trainable}
    loss = _cross_entropy(self.model, {**self.theta, **leaves}, x, y, None)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    gw = torch.zeros_like(w)
    for k, g in zip(self.layers.trainable, grads):
        gw[:, self.layers.group[k]] += (self.flat[k] @ g.reshape(-1).to(self.flat[k].dtype)).to(gw.dtype)
    if self.clip is not None:
        norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
        gw = gw * torch.clamp(self.clip / (norm + 1e-6), max=1.0)
    w.grad = gw * self.scale
    return loss.detach()


def _streamed_loss(self, w, x, y):
    """HyperplaneSpace.loss with <g_k, D_k> taken as each g_k is accumulated, and g_k freed right away."""
    from soupkit.engine.loop import _cross_entropy  # noqa: PLC0415

    self.move_to(w)
    gw = torch.zeros_like(w)
    sq = torch.zeros((), device=w.device)
    leaves = {}
    for k in self.layers.trainable:
        leaf = self.theta[k].detach().requires_grad_(True)

        def hook(p, k=k):
            nonlocal sq
            g = p.grad
            gw[:, self.layers.group[k]] += (self.flat[k] @ g.reshape(-1).to(self.flat[k].dtype)).to(gw.dtype)
            if self.clip is not None:
                sq = sq + g.float().pow(2).sum()
            p.grad = None

        leaf.register_post_accumulate_grad_hook(hook)
        leaves[k] = leaf
    loss = _cross_entropy(self.model, {**self.theta, **leaves}, x, y, None)
    loss.backward()
    if self.clip is not None:
        gw = gw * torch.clamp(self.clip / (sq.sqrt() + 1e-6), max=1.0)
    w.grad = gw * self.scale
    return loss.detach()


def _streamed_load_stack(self, indices, device="cpu", dtype=None, subtract=None, keys=None):
    """CheckpointPool.load_stack reading one tensor at a time from safetensors (no whole model next to the stack)."""
    from safetensors import safe_open  # noqa: PLC0415

    from soupkit.pool.formats import _Loaded  # noqa: PLC0415

    keys = list(self.spec if keys is None else keys)
    stack = _Loaded()
    for key in keys:
        spec = self.spec[key]
        stack[key] = torch.empty((len(indices), *spec.shape), device=device,
                                 dtype=(dtype or self.cast_dtype or spec.dtype) if spec.dtype.is_floating_point
                                 else spec.dtype)
    self._track(stack, len(indices))
    for row, i in enumerate(indices):
        with safe_open(str(self.sources[i]), framework="pt", device="cpu") as fh:
            for key in keys:
                stack[key][row].copy_(fh.get_tensor(key))
                if subtract is not None and key in subtract:
                    stack[key][row].sub_(subtract[key])
    return stack


def run_variant(variant: str, k: int, b: int, paths: list[str], threads: int) -> dict:
    import soupkit.engine.loop as learn  # noqa: PLC0415
    import soupkit.pool as pool  # noqa: PLC0415

    torch.set_num_threads(threads)
    if variant == "scaled_clip":
        learn.HyperplaneSpace.loss = _scaled_clip_loss
    if variant.startswith("streamed"):
        learn.HyperplaneSpace.loss = _streamed_loss
        pool.CheckpointPool.load_stack = _streamed_load_stack
    import soupkit  # noqa: PLC0415

    model = mt.build_model("ViT-B-32", 1000, 0)
    loader = mt.heldout(4, 2, 224, 1000, 0)
    res = soupkit.make_soup("mehl+", model, soupkit.CheckpointPool(paths[:k]), loader, inner_iterations=2,
                            model_batch_size=b, outer_iterations=2, clip_grad_norm=VARIANTS[variant],
                            progress=False)
    mbytes = mt.state_bytes(model)
    return {"variant": variant, "K": k, "b": b, "clip_grad_norm": VARIANTS[variant],
            "peak_memory_bytes": res.stats["peak_memory_bytes"],
            "peak_in_models": res.stats["peak_memory_bytes"] / mbytes, "seconds_total": res.stats["seconds_total"],
            "final_loss": res.history[-1], "alpha": res.params["alpha"].tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--b", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=HERE.parent / "outputs" / "benchmarks")
    args = p.parse_args()
    ckpt = args.out / "ckpt_experiment"
    paths = [str(x) for x in mt.make_checkpoints(mt.build_model("ViT-B-32", 1000, 0), args.k, ckpt)]
    results = []
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    try:
        for variant in args.variants:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "r.json"
                cmd = [sys.executable, __file__, "_worker", json.dumps([variant, args.k, args.b, paths, args.threads]),
                       str(out)]
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      env={**os.environ, **mt.MALLOC_ENV["live"]})
                if proc.returncode != 0:
                    print(variant, "FAILED", proc.stderr[-500:])
                    continue
                r = json.loads(out.read_text())
            results.append(r)
            print(f"{variant:14s} clip={r['clip_grad_norm']}: peak {r['peak_memory_bytes'] / 2**30:.2f} GiB "
                  f"({r['peak_in_models']:.2f} models), {r['seconds_total']:.1f} s, final loss {r['final_loss']:.6f}")
    finally:
        import shutil  # noqa: PLC0415

        shutil.rmtree(ckpt, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mehl_memory_experiment.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        variant, k, b, paths, threads = json.loads(sys.argv[2])
        Path(sys.argv[3]).write_text(json.dumps(run_variant(variant, k, b, paths, threads)))
    else:
        main()
