"""Every soup method of the paper behind one registry: ``make_soup(name, model, pool, val_loader, **options)``."""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import SoupConfig, config_for
from .evaluation import accuracy, predict
from .io import atomic_write_json
from .layers import layer_map
from .learn import BatchStream, HyperplaneSpace, SimplexSpace, optimise
from .memory import PeakMemory
from .pool import CheckpointPool, load_state_dict, save_state_dict

__all__ = ["SoupResult", "METHODS", "make_soup", "Method"]

StateDict = dict[str, Tensor]


@dataclass
class SoupResult:
    """What a soup method produced.

    Attributes:
        name: the method.
        state_dict: the soup's weights (None for the ensemble, which has no single model).
        coefficients: weight on each θ_i, ``[K]`` or ``[K, L]`` for the "+" methods; sums to 1 over K for
            every layer (not for the ``decentralize=False`` ablation). Ensemble: weights of the logits.
        layer_names: the L layers of the "+" methods, else None.
        stats: measured ``seconds_total``, ``seconds_per_epoch``, ``epochs``, ``peak_memory_bytes``, ...
        history: training loss per inner step (learned soups) or held-out accuracy per evaluation.
        members: the pool, for the ensemble.
        params: the raw learned variables (softmax logits, hyperplane α), for inspection.
    """

    name: str
    state_dict: StateDict | None
    coefficients: Tensor
    layer_names: list[str] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    members: CheckpointPool | None = None
    params: dict[str, Tensor] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Write ``soup.safetensors``, ``coefficients.safetensors`` and ``result.json`` (each atomically)."""
        directory = Path(directory)
        if self.state_dict is not None:
            save_state_dict(self.state_dict, directory / "soup.safetensors")
        save_state_dict({"coefficients": self.coefficients, **{f"params.{k}": v for k, v in self.params.items()}},
                        directory / "coefficients.safetensors")
        atomic_write_json(directory / "result.json", {
            "name": self.name, "layer_names": self.layer_names, "stats": self.stats, "history": self.history,
            "members": self.members.names if self.members is not None else None})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "SoupResult":
        """Read a result written by :meth:`save` (ensemble members are re-opened from their file names)."""
        directory = Path(directory)
        meta = json.loads((directory / "result.json").read_text())
        tensors = load_state_dict(directory / "coefficients.safetensors")
        soup = directory / "soup.safetensors"
        members = meta.get("members")
        return cls(meta["name"], load_state_dict(soup) if soup.exists() else None, tensors.pop("coefficients"),
                   meta["layer_names"], meta["stats"], meta["history"],
                   CheckpointPool(members) if members and meta["name"] == "ensemble" else None,
                   {k.removeprefix("params."): v for k, v in tensors.items()})


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
    models = [pool.load(i, cfg.device, cfg.dtype) for i in range(len(pool))]
    space = SimplexSpace(model, models, layers, cfg.logit_scale, cfg.clip_grad_norm)
    history: list[float] = []
    with _bar(cfg, steps, name) as bar:
        w = optimise(space, space.w0, batches, steps, cfg, history, lambda loss: bar.update(1))
    coefficients = space.coefficients(w)
    params = {"logits": w} | ({"logit_scale": space.scale.detach()} if space.scale is not None else {})
    return SoupResult(name, layers.complete(space.state(w)), coefficients if layerwise else coefficients[:, 0],
                      list(layers.names) if layerwise else None, history=history, params=params,
                      stats={"epochs": batches.epochs, "inner_iterations": steps, "outer_iterations": 1,
                             "model_batch_size": len(pool)})


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
    with ``prefetch``).
    """
    name = ("mehl" if blockwise else "hl") + ("+" if layerwise else "")
    k = len(pool)
    b = k
    if blockwise:
        b = cfg.model_batch_size or math.ceil(k / 4)
        if b > k:
            warnings.warn(f"model_batch_size={b} > K={k}: using b = K", stacklevel=3)
            b = k
    outer = cfg.outer_iterations or (math.ceil(k / b) if blockwise else 1)
    blocks = _block_schedule(k, b, outer, blockwise, cfg.seed)
    layers = layer_map(model, layerwise, cfg.layer_grouping)
    n_layers = len(layers)
    batches = BatchStream(loader, cfg.device, cfg.batch_size)
    steps = cfg.inner_iterations or math.ceil(cfg.epochs * batches.batches_per_epoch)
    keys = list(layers.mixed)

    # weights[i, l] on θ_i of the soup; ref[i, l] of the centre the directions start from; var = learned α/β
    if cfg.recenter:
        centre = pool.center(cfg.device, cfg.dtype, indices=blocks[0])
        weights = torch.zeros(k, n_layers)
        weights[blocks[0]] = 1 / len(blocks[0])
    else:
        centre = pool.center(cfg.device, cfg.dtype)
        weights = torch.full((k, n_layers), 1 / k)
    centre = {key: centre[key] for key in layers.forward_keys}  # aliases of tied tensors are re-added at the end
    soup = {key: v.clone() for key, v in centre.items()} if cfg.decentralize and not cfg.recenter else centre
    var = torch.zeros(k, n_layers) if cfg.decentralize else weights.clone()
    history: list[float] = []
    pending = None
    with _bar(cfg, steps * len(blocks), name) as bar:
        for t, block in enumerate(blocks):
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
            w = optimise(space, w0, batches, steps, cfg, history, lambda loss: bar.update(1))
            soup = space.move_to(w)
            step = ((w - w0) * space.scale).cpu()  # change of the weight on each θ_i of the block, [b, L]
            ref = weights.clone() if cfg.recenter else (torch.full_like(weights, 1 / k) if cfg.decentralize
                                                         else torch.zeros_like(weights))
            weights -= ref * step.sum(dim=0, keepdim=True)
            weights[block] += step
            if not cfg.recenter:
                var[block] = w.cpu()
            del stack, space
    coefficients = weights if layerwise else weights[:, 0]
    return SoupResult(name, layers.complete(soup), coefficients, list(layers.names) if layerwise else None,
                      history=history, params={"alpha" if cfg.decentralize else "beta": var},
                      stats={"epochs": batches.epochs, "inner_iterations": steps, "outer_iterations": len(blocks),
                             "model_batch_size": b})


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
    fn: Callable[..., SoupResult]
    description: str


METHODS: dict[str, Method] = {
    "best": Method(best_model, "best individual model on the held-out set"),
    "uniform": Method(uniform_soup, "uniform soup: mean of all K models"),
    "greedy": Method(greedy_soup, "greedy soup (model-soups)"),
    "learned": Method(lambda *a: learned_soup(*a, layerwise=False), "Learned-Soup: softmax, one weight per model"),
    "learned+": Method(lambda *a: learned_soup(*a, layerwise=True), "Learned-Soup+: softmax per layer"),
    "hl": Method(lambda *a: hyperplane_soup(*a, layerwise=False, blockwise=False), "HL-Soup: hyperplane, all K"),
    "hl+": Method(lambda *a: hyperplane_soup(*a, layerwise=True, blockwise=False), "HL-Soup+: per layer"),
    "mehl": Method(lambda *a: hyperplane_soup(*a, layerwise=False, blockwise=True), "MEHL-Soup: blocks of b"),
    "mehl+": Method(lambda *a: hyperplane_soup(*a, layerwise=True, blockwise=True), "MEHL-Soup+: per layer"),
    "ensemble": Method(ensemble, "ensemble: average of the K models' logits"),
}


def make_soup(name: str, model: nn.Module, pool: CheckpointPool | Iterable, val_loader: Iterable,
              **options: Any) -> SoupResult:
    """Run soup method ``name`` (one of ``METHODS``) and measure its time and peak memory.

    Args:
        name: method name, e.g. ``"mehl+"``.
        model: a module of the architecture (its weights are not used).
        pool: a :class:`CheckpointPool` (or anything it accepts as sources).
        val_loader: re-iterable ``(inputs, labels)`` batches of the held-out split.
        **options: fields of :class:`soupkit.config.SoupConfig`.
    """
    if name not in METHODS:
        raise ValueError(f"unknown soup method {name!r}; choose from {list(METHODS)}")
    cfg = config_for(name, **options)
    if not isinstance(pool, CheckpointPool):
        pool = CheckpointPool(pool)
    pool.check_model(model)
    start = time.perf_counter()
    with PeakMemory(cfg.device) as meter:
        result = METHODS[name].fn(model, pool, val_loader, cfg)
    seconds = time.perf_counter() - start
    epochs = result.stats.get("epochs", 0)
    result.stats.update(seconds_total=seconds, seconds_per_epoch=seconds / epochs if epochs else None,
                        peak_memory_bytes=meter.peak_bytes, memory_source=meter.source,
                        device=str(cfg.device), num_models=len(pool))
    return result
