"""(b) Is one MEHL-Soup+ inner step at most 1.2 x one plain training step of the same model on the same batch?

``time_steps`` alternates the two kinds of step in one (fresh) process and returns their medians and the
median of the per-pair ratios; ``benchmarks/memory_time.py`` runs it first and writes ``steps_<device>.csv``.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Sequence

# _bench_common first: it imports soupkit, which pins the CPU numerics before torch is imported
from _bench_common import _sync, build_model, environment, heldout, image_size

import torch  # noqa: E402
from torch import nn  # noqa: E402

from soupkit import CheckpointPool  # noqa: E402


# ---- (b): MEHL-Soup+ inner step vs plain training step ----------------------------------------------------------
def _mehl_space(model: nn.Module, paths: Sequence[str | Path], b: int, device: str, cfg: Any,
                cast_checkpoints: bool = False):
    """The HyperplaneSpace that ``make_soup("mehl+")`` builds for its first block (no recentring; ``cfg``'s
    clip, direction dtype and autocast; ``cast_checkpoints``: files in another dtype, cast when read)."""
    from soupkit.engine.layers import layer_map  # noqa: PLC0415
    from soupkit.engine.loop import HyperplaneSpace  # noqa: PLC0415

    pool = CheckpointPool([str(p) for p in paths[:b]], cast_dtype=torch.float32 if cast_checkpoints else None)
    layers = layer_map(model, True)
    centre = pool.center(device, torch.float32)
    centre = {key: centre[key] for key in layers.forward_keys}
    soup = {key: v.clone() for key, v in centre.items()}
    ddtype = cfg.systems.direction_dtype or torch.float32
    stack = pool.load_stack(list(range(b)), device, ddtype, subtract=centre, keys=list(layers.mixed))
    w0 = torch.zeros(b, len(layers), device=device)
    extra = {"autocast": cfg.systems.autocast_dtype} if cfg.systems.autocast else {}
    return HyperplaneSpace(model, soup, stack, layers, w0, None, cfg.algorithm.clip_grad_norm, **extra), w0


def time_steps(paths: Sequence[str | Path], *, arch: str, num_classes: int, device: str, b: int, batch_size: int,
               warmup: int = 1, pairs: int = 6, seed: int = 0,
               soup_options: dict[str, Any] | None = None, cast_checkpoints: bool = False) -> dict[str, Any]:
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
    space, w = _mehl_space(model, paths, b, device, cfg, cast_checkpoints)
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
