"""Every soup method of the paper behind one registry: ``make_soup(name, model, pool, val_loader, **options)``.

A method is one :class:`Method` in :data:`METHODS`: its function, its defaults and how tables and figures show it
(display name, family, colour, marker). ``register("mine", Method(...))`` adds one; the CLI, the notebooks'
parameter checks, the tables and the plots read everything else from here.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from soupkit.config import (HYPERPLANE_DEFAULTS, LEARNED_DEFAULTS, RELEASED_DEFAULTS, TASK_ARITHMETIC_DEFAULTS,
                            SoupConfig, with_options)
from soupkit.engine.evaluation import accuracy, predict
from soupkit.engine.heldout import check_heldout
from soupkit.errors import OptionError
from soupkit.methods.hyperplane import hyperplane_soup
from soupkit.methods.learned import learned_soup
from soupkit.methods.model_stock import model_stock
from soupkit.methods.result import SoupResult
from soupkit.methods.run_dir import forked_rng
from soupkit.methods.task_arithmetic import task_arithmetic
from soupkit.pool.checkpoint_pool import CheckpointPool
from soupkit.runtime.distributed import communicator
from soupkit.runtime.memory import MemoryCap, PeakMemory

__all__ = ["Method", "METHODS", "DEFAULTS", "DISPLAY", "register", "config_for", "table_order", "display_name", "make_soup"]


# ---- baselines --------------------------------------------------------------------------------------------
def _accuracies(model: nn.Module, pool: CheckpointPool, loader: Iterable, cfg: SoupConfig) -> list[float]:
    """Held-out accuracy of every model, read one at a time."""
    accs, device, dtype = [], cfg.systems.device, cfg.systems.dtype
    for i in tqdm(range(len(pool)), desc="held-out accuracy", disable=not cfg.run.progress):
        state = pool.load(i, device, dtype)
        accs.append(accuracy(*predict(model, state, loader, device)))
        del state  # before the next load: one model resident
    return accs


def _one_hot(k: int, i: int) -> Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), k).float()


def best_model(model, pool, loader, cfg) -> SoupResult:
    """The model with the highest held-out accuracy; among equal accuracies the first (lowest index).

    model-soups' best individual model is likewise the maximum held-out accuracy; the first-on-ties rule is
    soupkit's. Greedy soup orders ties the other way (higher index first, as model-soups does), so on a tie for
    the top the two start from different models.
    """
    accs = _accuracies(model, pool, loader, cfg)
    i = max(range(len(accs)), key=lambda j: (accs[j], -j))
    state = {k: v.clone() for k, v in pool.load(i, cfg.systems.device, cfg.systems.dtype).items()}
    return SoupResult("best", state, _one_hot(len(pool), i),
                      stats={"epochs": len(pool), "heldout_accuracies": accs, "chosen": [i]}, history=accs)


def uniform_soup(model, pool, loader, cfg) -> SoupResult:
    """The mean of all K models (streamed)."""
    return SoupResult("uniform", pool.center(cfg.systems.device, cfg.systems.dtype),
                      torch.full((len(pool),), 1 / len(pool)), stats={"epochs": 0})


def greedy_soup(model, pool, loader, cfg) -> SoupResult:
    """model-soups' greedy soup: in order of held-out accuracy, keep a model if the soup's accuracy improves.

    The order is model-soups' (``main.py``: sort by held-out accuracy ascending, then reverse): highest accuracy
    first and, among equal accuracies, the HIGHER index first. The first model starts the soup; each next one
    is kept only if the running average's held-out accuracy strictly improves (``cfg.algorithm.ties="reject"``,
    the original; ``"accept"`` also keeps it on equality).
    """
    accs = _accuracies(model, pool, loader, cfg)
    device, dtype = cfg.systems.device, cfg.systems.dtype
    order = sorted(range(len(pool)), key=lambda j: (-accs[j], -j))
    # running sum of the chosen models; a copy, as the pool may hand out the caller's own tensors
    total = {k: v.clone() for k, v in pool.load(order[0], device, dtype).items()}
    chosen, soup_acc, history = [order[0]], accs[order[0]], [accs[order[0]]]
    for i in tqdm(order[1:], desc="greedy soup", disable=not cfg.run.progress):
        state = pool.load(i, device, dtype)
        n = len(chosen) + 1
        candidate = {k: (v + state[k]) / n if v.is_floating_point() else v for k, v in total.items()}
        acc = accuracy(*predict(model, candidate, loader, device))
        history.append(acc)
        if acc > soup_acc or (cfg.algorithm.ties == "accept" and acc == soup_acc):
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


# ---- registry ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A soup method: ``fn(model, pool, loader, cfg) -> SoupResult``, and what the rest of soupkit needs to know.

    Attributes:
        description: one line for ``--help`` and the docs.
        display: its name in tables and legends ("MEHL-Soup+").
        family: methods of one family share a colour (``mehl``, ``mehl+`` and ``mehl+released``: "mehl").
        family_display: the family's name in legends ("MEHL-Soup(+)").
        colour: the family's colour in every figure (a matplotlib colour).
        marker, linestyle: tell a family's variants apart (plain: square, dashed; "+": circle, solid).
        learned: learns coefficients on the held-out set (a select split can stop it early).
        defaults: its :class:`SoupConfig` (the published settings); ``make_soup``'s (flat) options replace its values.
        table_row: its place in the tables (the paper's order; ties keep registration order).
        legend_row: its family's place in figure legends.
        constructs: builds a soup worth timing (the paper gives no construction time for best, uniform and
            ensemble: figures write "n/a (no construction)" for them).
        uses_data: reads the held-out loader (make_soup checks its first batch up front).
        reads_all_first: its first step reads every model, which checks them for NaN/Inf before any long
            computation; otherwise make_soup reads them once up front.
        resumable: checkpoints to and resumes from ``run_dir``.
        extendable: grows a finished result of its family with new checkpoints (``warm_start``).
    """

    fn: Callable[..., SoupResult]
    description: str
    display: str
    family: str
    family_display: str
    colour: str
    marker: str = "o"
    linestyle: str = "-"
    learned: bool = False
    defaults: SoupConfig = field(default_factory=SoupConfig)
    table_row: int = 100
    legend_row: int = 100
    constructs: bool = True
    uses_data: bool = True
    reads_all_first: bool = True
    resumable: bool = False
    extendable: bool = False


def _learned(layerwise: bool, description: str, display: str, row: int) -> Method:
    return Method(lambda *a: learned_soup(*a, layerwise=layerwise), description, display, "learned",
                  "Learned-Soup(+)", "tab:blue", *(("o", "-") if layerwise else ("s", "--")), learned=True,
                  defaults=LEARNED_DEFAULTS, table_row=row, legend_row=4)


def _hyperplane(layerwise: bool, blockwise: bool, description: str, display: str, row: int,
                name: str | None = None) -> Method:
    """An HL/MEHL method; ``name`` renames its result (a named option set of another method, see config.py)."""
    def run(*a) -> SoupResult:
        result = hyperplane_soup(*a, layerwise=layerwise, blockwise=blockwise)
        if name is not None:
            result.name = name
        return result

    family, family_display, colour, legend = ("mehl", "MEHL-Soup(+)", "tab:red", 6) if blockwise else \
        ("hl", "HL-Soup(+)", "tab:purple", 5)
    marker, ls = ("D", ":") if name else ("o", "-") if layerwise else ("s", "--")
    return Method(run, description, display, family, family_display, colour, marker, ls, learned=True,
                  defaults=RELEASED_DEFAULTS if name else HYPERPLANE_DEFAULTS, table_row=row, legend_row=legend,
                  resumable=True, extendable=blockwise)


# the paper's methods, in the paper's table order (table_row): baselines, model-wise, layer-wise ("+"), ensemble
METHODS: dict[str, Method] = {
    "best": Method(best_model, "best individual model on the held-out set", "Best individual model", "best",
                   "best individual model", "#4d4d4d", "^", table_row=0, legend_row=0, constructs=False, reads_all_first=False),
    "uniform": Method(uniform_soup, "uniform soup: mean of all K models", "Uniform-Soup", "uniform", "Uniform-Soup",
                      "tab:olive", "v", table_row=1, legend_row=1, constructs=False, uses_data=False),
    "greedy": Method(greedy_soup, "greedy soup (model-soups)", "Greedy-Soup", "greedy", "Greedy-Soup", "tab:green",
                     table_row=2, legend_row=3, reads_all_first=False),
    "learned": _learned(False, "Learned-Soup: softmax, one weight per model", "Learned-Soup", 3),
    "learned+": _learned(True, "Learned-Soup+: softmax per layer", "Learned-Soup+", 6),
    "hl": _hyperplane(False, False, "HL-Soup: hyperplane, all K", "HL-Soup", 4),
    "hl+": _hyperplane(True, False, "HL-Soup+: per layer", "HL-Soup+", 7),
    "mehl": _hyperplane(False, True, "MEHL-Soup: blocks of b", "MEHL-Soup", 5),
    "mehl+": _hyperplane(True, True, "MEHL-Soup+: per layer", "MEHL-Soup+", 8),
    "mehl+released": _hyperplane(True, True, "MEHL-Soup+ as in the released code: per-layer normalised directions, "
                                 "re-centred on the soup, gradient clipped at 1", "MEHL-Soup+ (released code)", 9,
                                 name="mehl+released"),
    "ensemble": Method(ensemble, "ensemble: average of the K models' logits", "Ensemble", "ensemble", "Ensemble",
                       "tab:brown", "P", table_row=10, legend_row=2, constructs=False, uses_data=False,
                       reads_all_first=False),
    # not the paper's: two soups of the fine-tunes AND the pretrained model θ_0 (CheckpointPool(..., pretrained=))
    "model_stock": Method(model_stock, "Model Stock (Jang et al., ECCV 2024): per layer, θ̄ pulled towards the "
                          "pretrained model by the task vectors' angle", "Model Stock", "model_stock", "Model Stock",
                          "tab:orange", "*", table_row=11, legend_row=7, uses_data=False),
    "task_arithmetic": Method(task_arithmetic, "task arithmetic: θ_0 + s·(θ̄ − θ_0), s chosen on the held-out set",
                              "Task arithmetic", "task_arithmetic", "Task arithmetic", "tab:pink", "h",
                              defaults=TASK_ARITHMETIC_DEFAULTS, table_row=12, legend_row=8),
}


def register(name: str, method: Method, replace_existing: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS` under ``name``: ``make_soup``, the CLI, the notebooks' checks, the tables
    and the plots then know it. An existing name is refused unless ``replace_existing``."""
    if not isinstance(method, Method):
        raise TypeError(f"register({name!r}, ...) takes a soupkit Method, not {type(method).__name__}")
    if name in METHODS and not replace_existing:
        raise OptionError(f"a method {name!r} is registered already (replace_existing=True replaces it)")
    METHODS[name] = method
    return method


class _Field(Mapping):
    """``{name: METHODS[name].<field>}`` for every registered method, read from :data:`METHODS` when asked (so
    a method registered later is in it)."""

    def __init__(self, field_name: str) -> None:
        self.field_name = field_name

    def __getitem__(self, name: str) -> Any:
        return getattr(METHODS[name], self.field_name)

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS)

    def __len__(self) -> int:
        return len(METHODS)

    def __repr__(self) -> str:
        return repr(dict(self))


DEFAULTS: Mapping[str, SoupConfig] = _Field("defaults")  # each method's SoupConfig
DISPLAY: Mapping[str, str] = _Field("display")  # each method's name in tables and legends


def config_for(name: str, **options: Any) -> SoupConfig:
    """The defaults of method ``name`` with ``options`` applied; unknown options raise TypeError."""
    if name not in METHODS:
        raise OptionError(f"unknown soup method {name!r}; choose from {list(METHODS)}")
    return with_options(METHODS[name].defaults, name, **options)


def table_order(names: Iterable[str] | None = None) -> list[str]:
    """``names`` (default: every method) in table order; names that are not methods go last, as given."""
    names = list(METHODS if names is None else names)
    rank = {m: (METHODS[m].table_row, i) for i, m in enumerate(METHODS)}
    return sorted(names, key=lambda m: rank.get(m, (float("inf"), names.index(m))))


def display_name(name: str) -> str:
    """``name``'s display name ("mehl+" -> "MEHL-Soup+"); a name that is not a method is its own."""
    return METHODS[name].display if name in METHODS else str(name)


def _preflight(model: nn.Module, pool: CheckpointPool, loader: Iterable, cfg: SoupConfig, method: Method) -> None:
    """The checks that would otherwise fail late: held-out batches that the head cannot score, NaN/Inf weights."""
    device, dtype = cfg.systems.device, cfg.systems.dtype
    if method.uses_data:
        state = pool.load(0, device, dtype)
        check_heldout(model, state, loader, device)
        if cfg.run.select_loader is not None:
            check_heldout(model, state, cfg.run.select_loader, device, what="select_loader")
        del state
    if not method.reads_all_first:
        pool.check_values(device, dtype)


_WARM: set[str] = set()


def _warm_up_optimizer(device) -> None:
    """One AdamW step on a scalar, once per process and device, outside the measured block.

    torch imports its compiler stack lazily at the first optimizer step (~2.5 s and ~70 MB of RSS on CPU):
    a one-time cost of the process, not of the soup method, which would otherwise land in its time and memory.
    """
    if str(device) in _WARM:
        return
    p = torch.nn.Parameter(torch.zeros((), device=device))
    opt = torch.optim.AdamW([p], lr=0.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    _WARM.add(str(device))


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
        **options: options of :class:`soupkit.config.SoupConfig`, flat (``SoupConfig.option_names()``). With
            ``parallel``, every rank of the process group calls ``make_soup`` with the same arguments; all get
            the same result, rank 0 writes ``run_dir``, and ``stats`` gains each rank's peak memory, time and
            resident models. ``warm_start=previous`` (MEHL-Soup(+)): grow a finished result -- a ``SoupResult``,
            its saved folder or its ``run_dir`` -- with the pool's models after its K_old first ones
            (``soupkit/methods/warm_start.py``).

    Raises:
        CheckpointError, DataError, DivergenceError, ResumeError, WarmStartError (all
        :class:`soupkit.errors.SoupkitError`);
        ``memory.MemoryCapExceeded`` when ``memory_cap_mb`` is set and the method needs more.
    """
    cfg = config_for(name, **options)
    method = METHODS[name]
    if not isinstance(pool, CheckpointPool):
        pool = CheckpointPool(pool)
    pool.check_model(model)
    if cfg.run.run_dir is not None and not method.resumable:
        warnings.warn(f"run_dir is used by HL/MEHL only; {name!r} ignores it", stacklevel=2)
    if cfg.run.warm_start is not None and not method.extendable:  # it would be ignored: the soup would not grow
        raise OptionError(f"warm_start grows a MEHL-Soup(+) result (mehl, mehl+, mehl+released); {name!r} cannot "
                          "start from one" + (" (HL trains all K in one block: mehl/mehl+ with model_batch_size=K "
                                              "is the same with a warm start)" if method.family == "hl" else ""))
    comm = communicator(cfg.systems.parallel)
    if comm is not None and not comm.is_main:
        cfg = replace(cfg, run=replace(cfg.run, progress=False))  # one progress bar per job
    device, cap_mb = cfg.systems.device, cfg.systems.memory_cap_mb
    with forked_rng(device) as seed:
        _preflight(model, pool, val_loader, cfg, method)
        _warm_up_optimizer(device)
        seed(cfg.run.seed)  # after the checks, so that they do not move the run's random stream
        start = time.perf_counter()
        pool.max_resident = pool.resident  # count the fine-tuned models this run holds at once
        cap = MemoryCap(int(cap_mb * 2**20), device) if cap_mb else nullcontext()
        with PeakMemory(device) as meter, cap:  # the cap measures what peak_memory_bytes reports
            result = method.fn(model, pool, val_loader, cfg)
        seconds = time.perf_counter() - start
    epochs = result.stats.get("epochs", 0)
    result.stats.update(seconds_total=seconds, seconds_per_epoch=seconds / epochs if epochs else None,
                        peak_memory_bytes=meter.peak_bytes, memory_source=meter.source,
                        device=str(device), num_models=len(pool), max_resident_models=pool.max_resident)
    if comm is not None:  # the rank's own numbers above; every rank's here
        per_rank = comm.gather((meter.peak_bytes, pool.max_resident, seconds))
        result.stats.update(parallel=cfg.systems.parallel, world_size=comm.world_size,
                            peak_memory_bytes_per_rank=[p for p, _, _ in per_rank],
                            max_resident_models_per_rank=[m for _, m, _ in per_rank],
                            seconds_total_per_rank=[t for _, _, t in per_rank])
    if cfg.run.run_dir is not None and method.resumable and (comm is None or comm.is_main):
        result.save(Path(cfg.run.run_dir) / "result")
    return result
