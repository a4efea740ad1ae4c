"""Every option of every soup method, and each method's defaults, in one place.

Defaults equal the code each method was published with: model-soups' official code for the baselines
(``main.py``: best, uniform, greedy, ensemble; ``learned_bylayer.py``: Learned-Soup), the paper's appendix B and
its released code (``MEHL_soup_layer.py``) for HL/MEHL. Every departure is stated beside its option here and in
its group of :class:`SoupConfig` (:class:`Algorithm`, :class:`Variant`, :class:`Systems`, :class:`Run`).

=============  ====  ==  ===================  ========  =====  =====================================================
method         lr    wd  inner iterations     schedule  warm   other
=============  ====  ==  ===================  ========  =====  =====================================================
learned(+)     0.05  0   5 epochs, all K      constant  0      softmax over models (per tensor for "+"), uniform
                                                               start, learned logit scale (= learned_bylayer.py)
hl(+)          0.01  0   5 epochs, 1 block    cosine    20 %   α = 0 start, directions θ_i − θ̄
mehl(+)        0.01  0   5 epochs per block   cosine    20 %   b = ceil(K/4) (paper: 18 of 72), one outer pass,
                                                               warm-up + cosine restarted for each block
mehl+released  0.01  0   5 epochs per block   cosine    20 %   MEHL-Soup+ as released: normalize_directions,
                                                               recenter, clip_grad_norm=1.0 (see below)
=============  ====  ==  ===================  ========  =====  =====================================================

best, uniform, greedy and ensemble have no optimiser; greedy soup is model-soups' ``main.py``: models tried by
held-out accuracy, highest first, the higher index first among equal accuracies, one kept only if the soup's
held-out accuracy strictly improves (``ties="reject"``). All learned soups use AdamW. Two methods that are not
the paper's, both needing the pretrained model θ_0, have no optimiser either: Model Stock (``model_stock``, no
option) and task arithmetic (``task_arithmetic``: its scale s from ``scale_grid``, default 0.0, 0.1, ..., 2.0,
by held-out accuracy). Departures from the original code, each also noted at its option:

* ``batch_size``: learned_bylayer.py trains on batches of 256; soupkit keeps the held-out loader's batches
  (None), and its notebooks, ``python -m soupkit`` and ``soupkit.experiments.run.RunSpec`` build that loader with 128
  examples per batch (the released MEHL code's data batch) for every learned soup -- pass ``batch_size=256``
  (or a loader of 256) to train Learned-Soup(+) exactly as model-soups did.
* ``learned`` (one weight per model): model-soups released only the layer-wise learned soup; the model-wise one
  uses the same settings (lr 0.05, constant, logit scale).
* ``best``: the model of highest held-out accuracy, the FIRST index among equal accuracies (soupkit's tie
  rule, kept; model-soups' best individual is likewise the model of maximum held-out accuracy).
  Greedy soup (model-soups' and soupkit's) starts from the HIGHER index among equal accuracies (ascending sort
  then reverse), so on a tie for the top ``best`` and greedy soup start from different models.
* ``mehl+`` is the paper's algorithm (Algorithm 1: directions θ_i − θ̄ about the centre of all K, no
  normalisation, no clipping); ``mehl+released`` is what the released code runs instead.

**The released MEHL-Soup+ variant** (``"mehl+released"``, the option set ``normalize_directions=True,
recenter=True, clip_grad_norm=1.0`` on the MEHL-Soup+ defaults; ``make_soup("mehl+released", ...)`` equals
``make_soup("mehl+", ..., normalize_directions=True, recenter=True, clip_grad_norm=1.0)``):

1. per-layer directions (θ_j − c) / ‖θ_j − c‖, the norm taken over each layer (a parameter tensor, or the
   tensors ``layer_grouping`` puts together); soupkit's one addition: a direction shorter than 1e-6 of the
   soup's norm in that layer (rounding noise, e.g. a bias no fine-tune changed) gets factor 0 instead of
   being blown up;
2. centre c: the mean of the first model block, afterwards the current soup (re-centred for each block);
3. coefficients start at 0 for each block (the soup is the centre);
4. the gradient of the loss w.r.t. the soup's weights is clipped to norm 1 before its inner products with the
   directions;
5. AdamW lr 0.01, weight decay 0; cosine schedule with 20 % linear warm-up, restarted for each block;
   5 inner epochs over the held-out set per block; b = ceil(K/4) models per block (the code: 18 of 72);
   one outer pass; data batch as for every method (128 in soupkit's notebooks, as in the released code).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Optional, Union

import torch

from soupkit.errors import OptionError, SoupkitError, UnknownOptionError

__all__ = ["SoupConfig", "Algorithm", "Variant", "Systems", "Run", "LEARNED_DEFAULTS", "HYPERPLANE_DEFAULTS",
           "RELEASED_DEFAULTS", "TASK_ARITHMETIC_GRID", "TASK_ARITHMETIC_DEFAULTS", "with_options",
           "MAIN_TABLE_SETTINGS", "Grouping", "parse_dtype"]

# which tensors share a coefficient in the "+" methods (soupkit.engine.layers.layer_map): None = each parameter
# tensor, "module" = the parameters of one module, or a callable name -> group label
Grouping = Union[None, str, Callable[[str], str]]


def _at_least_one(group: Any, names: Iterable[str]) -> None:
    """Each of the options ``names`` of ``group`` is None (not set) or at least 1."""
    for name in names:
        value = getattr(group, name)
        if value is not None and value < 1:
            raise OptionError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class Algorithm:
    """The optimisation: what a learned soup minimises and how (the options that make its coefficients).

    Attributes:
        lr, weight_decay: AdamW settings for the coefficients. Learned-Soup(+): 0.05, 0 (model-soups'
            learned_bylayer.py); HL/MEHL(+): 0.01, 0 (paper appendix B, released code).
        epochs: passes over the held-out loader per block of models (inner loop length); 5 for every learned
            soup, as in both original codes.
        inner_iterations: inner steps per block; overrides ``epochs`` when given.
        outer_iterations: blocks of models to train (MEHL); default one pass over all K models.
        model_batch_size: b, the models per block (MEHL); default ceil(K / 4); b > K is clamped to K with a
            warning (MEHL with b = K and one block is HL).
        warmup: fraction of each block's steps spent in linear warm-up. Learned-Soup(+): 0 (model-soups
            imports ``cosine_lr`` in learned_bylayer.py but never calls it); HL/MEHL(+): 0.2, restarted for
            each block (released code).
        schedule: ``"cosine"`` or ``"constant"`` (after warm-up). Learned-Soup(+): ``"constant"`` (model-soups:
            a constant lr); HL/MEHL(+): ``"cosine"`` to 0 (released code).
        batch_size: re-batch the held-out loader to this many examples per step (None keeps its batches, the
            default for every method). Departure: model-soups' learned soup uses batches of 256, the released
            MEHL code 128; soupkit's notebooks, CLI and ``RunSpec`` build a held-out loader of 128 for all
            learned soups (set 256 for Learned-Soup(+) exactly as model-soups ran it).
        clip_grad_norm: clip the gradient (w.r.t. the soup's weights for HL/MEHL, as the released code does;
            w.r.t. the logits for Learned-Soup) to this norm; None = no clipping (default for every method
            except ``"mehl+released"``: 1.0, as the released code). model-soups does not clip.
        logit_scale: Learned-Soup also learns a scalar multiplying the logits (as model-soups does; default
            True for Learned-Soup(+), unused by the others).
        layer_grouping: which parameter tensors share a coefficient in the "+" methods (see ``layers.py``).
        extend_passes: with ``warm_start`` (MEHL), how many passes over the new models the first blocks make
            (None: 1); see ``soupkit.methods.warm_start``.
        ties: greedy soup's rule for a candidate with held-out accuracy equal to the soup's:
            ``"reject"`` (default, model-soups: strict improvement) or ``"accept"``. (The ORDER in which
            greedy tries the models is model-soups' and not an option: by held-out accuracy, highest first,
            the higher index first among equal accuracies.)
        scale_grid: task arithmetic's candidate scales s of θ_0 + s·(θ̄ − θ_0), tried in this order (a
            sequence of numbers, or a comma-separated string for the CLI's ``--option scale_grid=0,0.5,1``);
            None: :data:`TASK_ARITHMETIC_GRID` (0.0 to 2.0 in steps of 0.1, the method's default). Unused by
            the others.
    """

    lr: float = 0.01
    weight_decay: float = 0.0
    epochs: float = 5.0
    inner_iterations: Optional[int] = None
    outer_iterations: Optional[int] = None
    model_batch_size: Optional[int] = None
    warmup: float = 0.2
    schedule: str = "cosine"
    batch_size: Optional[int] = None
    clip_grad_norm: Optional[float] = None
    logit_scale: bool = False
    layer_grouping: Grouping = None
    ties: str = "reject"
    scale_grid: Optional[tuple[float, ...]] = None
    extend_passes: Optional[int] = None

    def __post_init__(self) -> None:
        if self.scale_grid is not None:
            object.__setattr__(self, "scale_grid", _grid(self.scale_grid))
        if self.lr <= 0 or self.weight_decay < 0:
            raise OptionError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if self.schedule not in ("cosine", "constant"):
            raise OptionError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise OptionError(f"warmup is a fraction in [0, 1), got {self.warmup}")
        if self.ties not in ("reject", "accept"):
            raise OptionError(f"ties must be 'reject' or 'accept', got {self.ties!r}")
        _at_least_one(self, ("inner_iterations", "outer_iterations", "model_batch_size", "batch_size",
                             "extend_passes"))
        if self.epochs <= 0:
            raise OptionError(f"epochs must be > 0, got {self.epochs}")


@dataclass(frozen=True)
class Variant:
    """Which HL/MEHL variant: the directions and their centre (the paper's Algorithm 1 by default).

    Attributes:
        decentralize: directions θ_i − θ̄ (paper, default) or θ_i themselves (appendix D ablation; then the
            weights start at 1/K and need not sum to one).
        normalize_directions: divide each direction by its per-layer norm (released code's variant; default
            False = the paper's Algorithm 1, True for ``"mehl+released"``).
        recenter: use the current soup as the centre of each new block (released code's variant; the first
            block is centred on its own mean; default False = centre θ̄ of all K, True for
            ``"mehl+released"``); needs ``decentralize``. (``soupkit.methods.hyperplane.centre_policy`` turns
            these two options and ``normalize_directions`` into the outer loop's policy object.)
    """

    decentralize: bool = True
    normalize_directions: bool = False
    recenter: bool = False

    def __post_init__(self) -> None:
        if self.recenter and not self.decentralize:
            raise OptionError("recenter=True takes the directions θ_i − soup (decentralised); it cannot be combined "
                             "with decentralize=False")


@dataclass(frozen=True)
class Systems:
    """How a soup runs: devices, precision, overlap with reading, ranks, memory.

    Attributes:
        device: where models, coefficients and batches live (``"cpu"``, ``"cuda:0"``...).
        dtype: floating dtype the models are combined and run in.
        prefetch: read the next block of models on a background thread while the current one trains (on CUDA
            staged in pinned host memory and copied in one non-blocking transfer).
        direction_dtype: dtype the HL/MEHL directions are stored in (None: ``dtype``); ``torch.bfloat16`` or
            ``torch.float16`` (or "bf16"/"fp16") halve the b resident directions, products accumulate in
            float32. The directions θ_i − θ̄ are formed in ``dtype`` and rounded once; meant for decentralised
            directions (with ``decentralize=False`` the models themselves would be rounded).
        autocast: run the learned soups' forward passes under ``torch.autocast`` in "bf16" or "fp16" (None:
            off); the soup, its gradient and the coefficients stay in ``dtype``. fp16 has no loss scaling.
        sync_every: learned soups read the loss and check for NaN/Inf (and, on accelerators, label ranges)
            every this many inner steps instead of every step (no per-step device sync); a divergence is
            still reported with the step it started at. 1 = every step.
        parallel: spread a learned soup over the ranks of the initialised ``torch.distributed`` process group
            (every rank calls ``make_soup`` with the same arguments): ``"data"`` (each rank a part of every
            batch; all learned soups) or ``"model"`` (each rank a part of each block's models; HL/MEHL).
            None: this process alone. See ``soupkit/runtime/distributed.py``; other methods run whole on every rank.
        memory_cap_mb: stop the method (``memory.MemoryCapExceeded``) once it uses more than this many MB above
            the level at its start -- the quantity ``peak_memory_bytes`` reports; stands for a smaller machine
            (the paper's ">256GB"). On CPU the run must be on the main thread. None: no cap.
    """

    device: Any = "cpu"
    dtype: torch.dtype = torch.float32
    prefetch: bool = False
    direction_dtype: Optional[torch.dtype] = None
    autocast: Optional[str] = None
    sync_every: int = 25
    parallel: Optional[str] = None
    memory_cap_mb: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.direction_dtype, str):
            object.__setattr__(self, "direction_dtype", parse_dtype(self.direction_dtype, "direction_dtype"))
        if self.direction_dtype is not None and not (isinstance(self.direction_dtype, torch.dtype)
                                                     and self.direction_dtype.is_floating_point):
            raise OptionError(f"direction_dtype must be a floating torch dtype, got {self.direction_dtype!r}")
        if self.autocast not in (None, *_AUTOCAST):
            raise OptionError(f"autocast must be None or one of {sorted(_AUTOCAST)}, got {self.autocast!r}")
        _at_least_one(self, ("sync_every",))
        if self.parallel not in (None, "data", "model"):
            raise OptionError(f"parallel must be 'data', 'model' or None, got {self.parallel!r}")

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """``autocast`` as a torch dtype (None when off)."""
        return _AUTOCAST[self.autocast] if self.autocast is not None else None


@dataclass(frozen=True)
class Run:
    """The harness around a soup: seeding, progress, early stopping, checkpoints, checks.

    Attributes:
        progress: show tqdm progress bars.
        seed: seeds the order of model blocks (MEHL) and the global torch RNG inside the run (e.g. a shuffling
            held-out loader); the caller's RNG state is restored afterwards. Same seed, same machine: same
            coefficients and accuracies.
        select_loader: optional held-out part used for early stopping: the coefficients with the best
            accuracy on it (checked every ``eval_every`` steps and at the end of each block) are kept.
        eval_every: steps between early-stopping checks.
        run_dir: HL/MEHL checkpoint their state here after every outer iteration and write the result at the end;
            run again with the same arguments, they resume (see ``soupkit/methods/run_dir.py``). None: no checkpoints.
        check_basin: learned soups warn (``SharedBasinWarning``) when the models do not look like fine-tunes
            of one pretrained model (``checks.check_shared_basin``; free after the centre pass).
        warm_start: MEHL-Soup(+) only: grow a finished result with new checkpoints -- a ``SoupResult`` of
            HL/MEHL, the folder one was saved to, or the ``run_dir`` of a finished run; the pool must begin with
            that result's models (same files, same order). See ``soupkit/methods/warm_start.py``. None: a fresh run.
    """

    progress: bool = True
    seed: int = 0
    select_loader: Optional[Iterable] = None
    eval_every: int = 50
    run_dir: Optional[Union[str, os.PathLike]] = None
    check_basin: bool = True
    warm_start: Any = None

    def __post_init__(self) -> None:
        _at_least_one(self, ("eval_every",))


# the groups by their field name in SoupConfig, and each flat option name's group (make_soup, the CLI and
# run.json speak flat options; the code reads them from their group)
_GROUPS: dict[str, type] = {"algorithm": Algorithm, "variant": Variant, "systems": Systems, "run": Run}
_GROUP_OF: dict[str, str] = {f.name: group for group, cls in _GROUPS.items() for f in fields(cls)}


@dataclass(frozen=True)
class SoupConfig:
    """Options of :func:`soupkit.make_soup`, in four groups. Methods ignore options that do not apply to them.

    Callers give the options flat (``make_soup(..., lr=0.01, device="cuda")``, :func:`with_options`, the CLI's
    ``--option``); :meth:`option_names`, :meth:`from_options` and :meth:`options` route them to their group
    and back, so that nothing outside this module needs to know which group holds an option.

    Attributes:
        algorithm: the optimisation (:class:`Algorithm`).
        variant: the HL/MEHL variant (:class:`Variant`).
        systems: devices, precision, ranks, memory (:class:`Systems`).
        run: seeding, progress, early stopping, checkpoints (:class:`Run`).
    """

    algorithm: Algorithm = field(default_factory=Algorithm)
    variant: Variant = field(default_factory=Variant)
    systems: Systems = field(default_factory=Systems)
    run: Run = field(default_factory=Run)

    def __post_init__(self) -> None:
        for name, group in _GROUPS.items():
            value = getattr(self, name)
            if not isinstance(value, group):
                raise TypeError(f"SoupConfig.{name} must be of type {group.__name__}, got {type(value).__name__}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Every flat option name, group by group."""
        return tuple(_GROUP_OF)

    @classmethod
    def from_options(cls, **options: Any) -> SoupConfig:
        """The default options with the flat ``options`` applied; unknown options raise TypeError."""
        return _apply(cls(), options, "SoupConfig")

    def options(self) -> dict[str, Any]:
        """The options flat, ``{name: value}`` (``from_options(**cfg.options()) == cfg``)."""
        return {name: getattr(getattr(self, group), name) for name, group in _GROUP_OF.items()}


def _apply(cfg: SoupConfig, options: dict[str, Any], where: str) -> SoupConfig:
    """``cfg`` with flat ``options`` applied, each in its group (validated again); unknown ones raise TypeError."""
    unknown = sorted(set(options) - set(_GROUP_OF))
    if unknown:
        raise UnknownOptionError(f"unknown option(s) {unknown} for {where}; valid: {sorted(_GROUP_OF)}")
    by_group: dict[str, dict[str, Any]] = {}
    for name, value in options.items():
        by_group.setdefault(_GROUP_OF[name], {})[name] = value
    return replace(cfg, **{group: replace(getattr(cfg, group), **values) for group, values in by_group.items()})


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _grid(value: Any) -> tuple[float, ...]:
    """``scale_grid`` as a tuple of finite floats: from a sequence of numbers or a string ``"0,0.5,1"``."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        grid = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise OptionError(f"scale_grid must be numbers (a sequence, or '0,0.5,1'), got {value!r}") from None
    if not grid or not all(math.isfinite(v) for v in grid):
        raise OptionError(f"scale_grid must hold at least one finite number, got {value!r}")
    return grid


# short names beside torch's own ("bfloat16", "half", "int8", ...); not autocast's table, which has no fp32
_DTYPE_ALIASES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str | torch.dtype, option: str = "dtype", *, floating: bool = False,
                error: type[SoupkitError] = OptionError) -> torch.dtype:
    """The torch dtype a name stands for: ``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype's name (``"bfloat16"``,
    ``"float"``, ``"int8"``), any case; a torch dtype is returned as it is.

    Args:
        option: the option or flag the name was given as, for the message.
        floating: refuse non-floating dtypes (``int8``...).
        error: the :class:`SoupkitError` to raise (the planner raises its ``PlanError``).

    Raises:
        ``error`` (default :class:`OptionError`) naming ``option`` when ``name`` is not a (floating) torch dtype.
    """
    if isinstance(name, torch.dtype):
        found: Any = name
    elif isinstance(name, str):
        found = _DTYPE_ALIASES.get(name.lower(), getattr(torch, name.lower(), None))
    else:
        found = None
    if not isinstance(found, torch.dtype):
        raise error(f"{option}={name!r} is not a torch dtype (bfloat16, float16, float32, ...)")
    if floating and not found.is_floating_point:
        raise error(f"{option}={name!r} is not a floating torch dtype (float32, bfloat16, float16)")
    return found


def with_options(defaults: SoupConfig, name: str, **options: Any) -> SoupConfig:
    """``defaults`` (of method ``name``) with the flat ``options`` applied; unknown options raise TypeError."""
    return _apply(defaults, options, f"make_soup({name!r})")


# The published defaults, one option set per kind of method (soupkit.methods.registry gives each method its own):
# model-soups' learned_bylayer.py: AdamW lr 0.05, wd 0, 5 epochs, constant lr (no warm-up), learned logit scale
LEARNED_DEFAULTS = SoupConfig(algorithm=Algorithm(lr=0.05, weight_decay=0.0, epochs=5.0, schedule="constant",
                                                  warmup=0.0, logit_scale=True))
# paper appendix B / released MEHL code: AdamW lr 0.01, wd 0, 5 epochs per block, cosine with 20 % warm-up
HYPERPLANE_DEFAULTS = SoupConfig(algorithm=Algorithm(lr=0.01, weight_decay=0.0, epochs=5.0, schedule="cosine",
                                                     warmup=0.2))
# the released MEHL-Soup+ code (MEHL_soup_layer.py); described in full in the module docstring
RELEASED_DEFAULTS = with_options(HYPERPLANE_DEFAULTS, "mehl+released", normalize_directions=True, recenter=True,
                                 clip_grad_norm=1.0)
# task arithmetic (not a method of the paper): the scale s of θ_0 + s·(θ̄ − θ_0) from 0 (θ_0) to 2 in steps of 0.1
TASK_ARITHMETIC_GRID: tuple[float, ...] = tuple(i / 10 for i in range(21))
TASK_ARITHMETIC_DEFAULTS = SoupConfig(algorithm=Algorithm(scale_grid=TASK_ARITHMETIC_GRID))


# Notebook 02's settings at the embedded scale (its parameters cell holds the same literals: papermill reads only
# literals there, and tests/test_cli.py keeps both equal). `python -m soupkit --zoo` defaults to them through
# soupkit.experiments.run.main_table_options, so one method on one zoo gives one soup in the notebook and on the command line.
# The numbers are written here once: the zoos' loaders, RunSpec, seed_study, SideStudySettings and the ablations'
# Setting take their defaults from this dict (its learning settings and seed come from the defaults above).
MAIN_TABLE_SETTINGS: dict[str, Any] = {
    "heldout_size": 2000, "select_fraction": 0.0, "batch_size": 128, "eval_batch_size": 500, "seed": Run().seed,
    "model_batch_size": 8, "learned_lr": LEARNED_DEFAULTS.algorithm.lr,
    "hyperplane_lr": HYPERPLANE_DEFAULTS.algorithm.lr,
    "weight_decay": HYPERPLANE_DEFAULTS.algorithm.weight_decay, "epochs": HYPERPLANE_DEFAULTS.algorithm.epochs,
}
