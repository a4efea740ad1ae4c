"""Every soup method of the paper behind one registry: ``make_soup(name, model, pool, val_loader, **options)``."""
from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpointing import RunDir, RunState, describe_run, forked_rng
from .checks import check_heldout, check_shared_basin
from .config import SoupConfig, config_for
from .errors import DivergenceError
from .evaluation import accuracy, predict
from .layers import LayerMap, layer_map
from .learn import BatchStream, HyperplaneSpace, SimplexSpace, optimise
from .memory import PeakMemory
from .pool import CheckpointPool
from .soup_result import SoupResult

__all__ = ["SoupResult", "METHODS", "make_soup", "Method"]

StateDict = dict[str, Tensor]


# ---- baselines --------------------------------------------------------------------------------------------
def _accuracies(model: nn.Module, pool: CheckpointPool, loader: Iterable, cfg: SoupConfig) -> list[float]:
    """Held-out accuracy of every model, read one at a time."""
    accs = []
    for i in tqdm(range(len(pool)), desc="held-out accuracy", disable=not cfg.progress):
        state = pool.load(i, cfg.device, cfg.dtype)
        accs.append(accuracy(*predict(model, state, loader, cfg.device)))
        del state  # before the next load: one model resident
    return accs


def _one_hot(k: int, i: int) -> Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), k).float()


def best_model(model, pool, loader, cfg) -> SoupResult:
    """The model with the highest held-out accuracy (first one on ties)."""
    accs = _accuracies(model, pool, loader, cfg)
    i = max(range(len(accs)), key=lambda j: (accs[j], -j))
    state = {k: v.clone() for k, v in pool.load(i, cfg.device, cfg.dtype).items()}
    return SoupResult("best", state, _one_hot(len(pool), i),
                      stats={"epochs": len(pool), "heldout_accuracies": accs, "chosen": [i]}, history=accs)


def uniform_soup(model, pool, loader, cfg) -> SoupResult:
    """The mean of all K models (streamed)."""
    return SoupResult("uniform", pool.center(cfg.device, cfg.dtype), torch.full((len(pool),), 1 / len(pool)),
                      stats={"epochs": 0})


def greedy_soup(model, pool, loader, cfg) -> SoupResult:
    """model-soups' greedy soup: in order of held-out accuracy, keep a model if the soup's accuracy improves."""
    accs = _accuracies(model, pool, loader, cfg)
    order = sorted(range(len(pool)), key=lambda j: (-accs[j], j))
    # running sum of the chosen models; a copy, as the pool may hand out the caller's own tensors
    total = {k: v.clone() for k, v in pool.load(order[0], cfg.device, cfg.dtype).items()}
    chosen, soup_acc, history = [order[0]], accs[order[0]], [accs[order[0]]]
    for i in tqdm(order[1:], desc="greedy soup", disable=not cfg.progress):
        state = pool.load(i, cfg.device, cfg.dtype)
        n = len(chosen) + 1
        candidate = {k: (v + state[k]) / n if v.is_floating_point() else v for k, v in total.items()}
        acc = accuracy(*predict(model, candidate, loader, cfg.device))
        history.append(acc)
        if acc > soup_acc or (cfg.ties == "accept" and acc == soup_acc):
            for k, v in total.items():
                if v.is_floating_point():
                    v.add_(state[k])
            chosen.append(i)
            soup_acc = acc
        del state, candidate
    soup = {k: v / len(chosen) if v.is_floating_point() else v for k, v in total.items()}
    coefficients = torch.zeros(len(pool))
    coefficients[chosen] = 1 / len(chosen)
    return SoupResult("greedy", soup, coefficients, history=history,
                      stats={"epochs": 2 * len(pool) - 1, "heldout_accuracies": accs, "chosen": chosen,
                             "heldout_accuracy": soup_acc})


def ensemble(model, pool, loader, cfg) -> SoupResult:
    """Average of the K models' logits; no weights to construct (evaluate() reads the members)."""
    return SoupResult("ensemble", None, torch.full((len(pool),), 1 / len(pool)), members=pool, stats={"epochs": 0})


# ---- learned soups ----------------------------------------------------------------------------------------
def _bar(cfg: SoupConfig, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not cfg.progress)


def learned_soup(model, pool, loader, cfg, layerwise: bool) -> SoupResult:
    """Learned-Soup(+) as Wortsman et al.: softmax coefficients over all K models held at once."""
    name = "learned+" if layerwise else "learned"
    layers = layer_map(model, layerwise, cfg.layer_grouping)
    batches = BatchStream(loader, cfg.device, cfg.batch_size)
    steps = cfg.inner_iterations or math.ceil(cfg.epochs * batches.batches_per_epoch)
    models = [pool.load(i, cfg.device, cfg.dtype) for i in range(len(pool))]  # checks NaN/Inf of each
    basin = _check_basin(pool, models, cfg)
    space = SimplexSpace(model, models, layers, cfg.logit_scale, cfg.clip_grad_norm)
    history: list[float] = []
    with _bar(cfg, steps, name) as bar:
        w = optimise(space, space.w0, batches, steps, cfg, history, lambda loss: bar.update(1))
    coefficients = space.coefficients(w)
    params = {"logits": w} | ({"logit_scale": space.scale.detach()} if space.scale is not None else {})
    return SoupResult(name, layers.complete(space.state(w)), coefficients if layerwise else coefficients[:, 0],
                      list(layers.names) if layerwise else None, history=history, params=params,
                      stats={"epochs": batches.epochs, "inner_iterations": steps, "outer_iterations": 1,
                             "model_batch_size": len(pool), "basin_mean_cosine": basin})


def _check_basin(pool: CheckpointPool, models: list[StateDict], cfg: SoupConfig) -> float | None:
    """check_shared_basin with the centre of the resident ``models`` (no read); its mean cosine for the stats."""
    if not cfg.check_basin or len(models) < 2:
        return None
    centre = {k: sum(m[k] for m in models) / len(models) for k, v in models[0].items() if v.is_floating_point()}
    return check_shared_basin(pool, centre).mean_cosine


def _block_schedule(k: int, b: int, outer: int, blockwise: bool, seed: int) -> list[list[int]]:
    """Blocks of model indices: each pass over the K models is a seeded permutation cut into ceil(K/b) blocks."""
    if not blockwise:
        return [list(range(k)) for _ in range(outer)]
    gen = torch.Generator().manual_seed(seed)
    blocks: list[list[int]] = []
    while len(blocks) < outer:
        perm = torch.randperm(k, generator=gen).tolist()
        blocks += [sorted(perm[j:j + b]) for j in range(0, k, b)]
    return blocks[:outer]


def hyperplane_soup(model, pool, loader, cfg, layerwise: bool, blockwise: bool) -> SoupResult:
    """HL-Soup(+) (one block of all K models) and MEHL-Soup(+) (blocks of b models, block coordinate descent).

    Resident: the centre θ̄, the soup and the b directions of the current block (b + 2 models; 2b + 2
    with ``prefetch``). With ``cfg.run_dir`` the state is checkpointed after every block and resumed.
    """
    name = ("mehl" if blockwise else "hl") + ("+" if layerwise else "")
    k = len(pool)
    b = k
    if blockwise:
        b = cfg.model_batch_size or math.ceil(k / 4)
        if b > k:
            warnings.warn(f"model_batch_size={b} > K={k}: using b = K", stacklevel=4)
            b = k
    outer = cfg.outer_iterations or (math.ceil(k / b) if blockwise else 1)
    blocks = _block_schedule(k, b, outer, blockwise, cfg.seed)
    layers = layer_map(model, layerwise, cfg.layer_grouping)
    batches = BatchStream(loader, cfg.device, cfg.batch_size)
    run = None
    if cfg.run_dir is not None:  # locks the directory and refuses another run's state, before any reading
        run = RunDir(cfg.run_dir, describe_run(name, cfg, pool, layers, batches, blocks))
    with run if run is not None else nullcontext():
        return _hyperplane_blocks(name, model, pool, cfg, layers, batches, blocks, b, run)


def _hyperplane_blocks(name: str, model: nn.Module, pool: CheckpointPool, cfg: SoupConfig, layers: LayerMap,
                       batches: BatchStream, blocks: list[list[int]], b: int, run: RunDir | None) -> SoupResult:
    """The outer loop of :func:`hyperplane_soup`, from the saved state in ``run`` if there is one."""
    k, n_layers, layerwise = len(pool), len(layers), name.endswith("+")
    steps = cfg.inner_iterations or math.ceil(cfg.epochs * batches.batches_per_epoch)
    keys = list(layers.mixed)

    # one streamed pass before any training: the centre, and (in the pool) the NaN/Inf check and the norms of
    # every model, which the basin check and the resume check reuse
    full = pool.center(cfg.device, cfg.dtype) if cfg.check_basin or not cfg.recenter else None
    pool.check_values(cfg.device, cfg.dtype)  # a no-op after that pass; recenter without it reads block 0 only
    basin = check_shared_basin(pool, full).mean_cosine if cfg.check_basin else None
    centre = full if not cfg.recenter else pool.center(cfg.device, cfg.dtype, indices=blocks[0])
    del full

    # weights[i, l] on θ_i of the soup; ref[i, l] of the centre the directions start from; var = learned α/β
    if cfg.recenter:
        weights = torch.zeros(k, n_layers)
        weights[blocks[0]] = 1 / len(blocks[0])
    else:
        weights = torch.full((k, n_layers), 1 / k)
    centre = {key: centre[key] for key in layers.forward_keys}  # aliases of tied tensors are re-added at the end
    soup = {key: v.clone() for key, v in centre.items()} if cfg.decentralize and not cfg.recenter else centre
    var = torch.zeros(k, n_layers) if cfg.decentralize else weights.clone()
    history: list[float] = []
    saved = run.restore(pool, batches, cfg.device) if run is not None else None
    first = 0 if saved is None else saved.blocks_done
    if saved is not None:
        weights, var, soup, history = saved.weights, saved.var, saved.soup, saved.history
    pending = None
    with _bar(cfg, steps * len(blocks), name) as bar:
        bar.update(steps * first)
        for t in range(first, len(blocks)):
            block = blocks[t]
            subtract = None if not cfg.decentralize else (None if cfg.recenter else centre)
            if pending is not None:
                stack = pending.result()
            else:
                stack = pool.load_stack(block, cfg.device, cfg.dtype, subtract=subtract, keys=keys)
            if cfg.prefetch and t + 1 < len(blocks):
                pending = pool.prefetch_stack(blocks[t + 1], device=cfg.device, dtype=cfg.dtype,
                                              subtract=subtract, keys=keys)
            if cfg.recenter:  # the current soup is the centre: subtract it now (it moved since the prefetch)
                for key in keys:
                    stack[key].sub_(soup[key])
            scale = _inverse_norms(stack, soup, layers, len(block)) if cfg.normalize_directions else None
            w0 = torch.zeros(len(block), n_layers) if cfg.recenter else var[block]
            w0 = w0.to(cfg.device)
            space = HyperplaneSpace(model, soup, stack, layers, w0, scale, cfg.clip_grad_norm)
            bar.set_postfix(block=f"{t + 1}/{len(blocks)}", b=len(block))
            try:
                w = optimise(space, w0, batches, steps, cfg, history, lambda loss: bar.update(1))
                soup = space.move_to(w)
                _check_finite(soup, layers.trainable)
            except DivergenceError as err:
                kept = f"; {run.path} keeps the state after block {t}" if run is not None else ""
                raise DivergenceError(f"outer iteration {t + 1}/{len(blocks)}: {err}{kept}") from None
            step = ((w - w0) * space.scale).cpu()  # change of the weight on each θ_i of the block, [b, L]
            ref = weights.clone() if cfg.recenter else (torch.full_like(weights, 1 / k) if cfg.decentralize
                                                         else torch.zeros_like(weights))
            weights -= ref * step.sum(dim=0, keepdim=True)
            weights[block] += step
            if not cfg.recenter:
                var[block] = w.cpu()
            del stack, space
            if run is not None:
                run.save(RunState(t + 1, weights, var, soup, history), pool, batches)
    coefficients = weights if layerwise else weights[:, 0]
    resumed = {"resumed_from_block": first} if run is not None else {}
    return SoupResult(name, layers.complete(soup), coefficients, list(layers.names) if layerwise else None,
                      history=history, params={"alpha" if cfg.decentralize else "beta": var},
                      stats={"epochs": batches.epochs, "inner_iterations": steps, "outer_iterations": len(blocks),
                             "model_batch_size": b, "basin_mean_cosine": basin, **resumed})


def _check_finite(soup: StateDict, keys: Iterable[str]) -> None:
    """Parameters only: a buffer may hold legitimate infinities (a mask of -inf)."""
    bad = [k for k in keys if not torch.isfinite(soup[k]).all()]
    if bad:
        raise DivergenceError(f"the soup holds NaN/Inf in {bad[0]!r}; lower lr or add clip_grad_norm")


def _inverse_norms(stack: StateDict, soup: StateDict, layers, b: int) -> Tensor:
    """``[b, L]``: 1 / ‖D_{i,l}‖ over the parameter tensors of each layer.

    A direction shorter than 1e-6 of its layer's norm in the soup is rounding noise (e.g. a bias that no
    fine-tune changed); dividing by it would blow the noise up, so its factor is 0: it stays fixed.
    """
    device = next(iter(stack.values())).device
    sq = torch.zeros(b, len(layers), device=device)
    ref = torch.zeros(len(layers), device=device)
    for key in layers.trainable:
        sq[:, layers.group[key]] += stack[key].reshape(b, -1).float().pow(2).sum(dim=1)
        ref[layers.group[key]] += soup[key].float().pow(2).sum()
    norms = sq.sqrt()
    return torch.where(norms > 1e-6 * ref.sqrt() + 1e-12, 1 / norms, torch.zeros_like(norms))


# ---- registry ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A soup method: ``fn(model, pool, loader, cfg)``.

    Attributes:
        uses_data: reads the held-out loader (make_soup checks its first batch up front).
        reads_all_first: its first step reads every model, which checks them for NaN/Inf before any long
            computation; otherwise make_soup reads them once up front.
        resumable: checkpoints to and resumes from ``run_dir``.
    """

    fn: Callable[..., SoupResult]
    description: str
    uses_data: bool = True
    reads_all_first: bool = True
    resumable: bool = False


def _hyperplane(layerwise: bool, blockwise: bool, description: str) -> Method:
    return Method(lambda *a: hyperplane_soup(*a, layerwise=layerwise, blockwise=blockwise), description,
                  resumable=True)


METHODS: dict[str, Method] = {
    "best": Method(best_model, "best individual model on the held-out set", reads_all_first=False),
    "uniform": Method(uniform_soup, "uniform soup: mean of all K models", uses_data=False),
    "greedy": Method(greedy_soup, "greedy soup (model-soups)", reads_all_first=False),
    "learned": Method(lambda *a: learned_soup(*a, layerwise=False), "Learned-Soup: softmax, one weight per model"),
    "learned+": Method(lambda *a: learned_soup(*a, layerwise=True), "Learned-Soup+: softmax per layer"),
    "hl": _hyperplane(False, False, "HL-Soup: hyperplane, all K"),
    "hl+": _hyperplane(True, False, "HL-Soup+: per layer"),
    "mehl": _hyperplane(False, True, "MEHL-Soup: blocks of b"),
    "mehl+": _hyperplane(True, True, "MEHL-Soup+: per layer"),
    "ensemble": Method(ensemble, "ensemble: average of the K models' logits", uses_data=False,
                       reads_all_first=False),
}


def _preflight(model: nn.Module, pool: CheckpointPool, loader: Iterable, cfg: SoupConfig, method: Method) -> None:
    """The checks that would otherwise fail late: held-out batches that the head cannot score, NaN/Inf weights."""
    if method.uses_data:
        state = pool.load(0, cfg.device, cfg.dtype)
        check_heldout(model, state, loader, cfg.device)
        if cfg.select_loader is not None:
            check_heldout(model, state, cfg.select_loader, cfg.device, what="select_loader")
        del state
    if not method.reads_all_first:
        pool.check_values(cfg.device, cfg.dtype)


def make_soup(name: str, model: nn.Module, pool: CheckpointPool | Iterable, val_loader: Iterable,
              **options: Any) -> SoupResult:
    """Run soup method ``name`` (one of ``METHODS``) and measure its time and peak memory.

    Before any long computation it checks the pool (files, keys, shapes, dtypes, NaN/Inf), the held-out
    loader (non-empty, labels within the head's C classes) and, for learned soups, that the models share a
    basin (see ``docs/checks.md``). The checks done here are not counted in ``seconds_total``.

    Args:
        name: method name, e.g. ``"mehl+"``.
        model: a module of the architecture (its weights are not used).
        pool: a :class:`CheckpointPool` (or anything it accepts as sources).
        val_loader: re-iterable ``(inputs, labels)`` batches of the held-out split.
        **options: fields of :class:`soupkit.config.SoupConfig`.

    Raises:
        CheckpointError, DataError, DivergenceError, ResumeError (all :class:`soupkit.errors.SoupkitError`).
    """
    if name not in METHODS:
        raise ValueError(f"unknown soup method {name!r}; choose from {list(METHODS)}")
    cfg = config_for(name, **options)
    method = METHODS[name]
    if not isinstance(pool, CheckpointPool):
        pool = CheckpointPool(pool)
    pool.check_model(model)
    if cfg.run_dir is not None and not method.resumable:
        warnings.warn(f"run_dir is used by HL/MEHL only; {name!r} ignores it", stacklevel=2)
    with forked_rng(cfg.device) as seed:
        _preflight(model, pool, val_loader, cfg, method)
        seed(cfg.seed)  # after the checks, so that they do not move the run's random stream
        start = time.perf_counter()
        pool.max_resident = pool.resident  # count the fine-tuned models this run holds at once
        with PeakMemory(cfg.device) as meter:
            result = method.fn(model, pool, val_loader, cfg)
        seconds = time.perf_counter() - start
    epochs = result.stats.get("epochs", 0)
    result.stats.update(seconds_total=seconds, seconds_per_epoch=seconds / epochs if epochs else None,
                        peak_memory_bytes=meter.peak_bytes, memory_source=meter.source,
                        device=str(cfg.device), num_models=len(pool), max_resident_models=pool.max_resident)
    if cfg.run_dir is not None and method.resumable:
        result.save(Path(cfg.run_dir) / "result")
    return result
