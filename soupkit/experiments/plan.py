"""Memory planner: the peak memory each soup method needs, predicted before running it, and whether it fits.

    python -m soupkit.experiments.plan --zoo outputs/zoo --k 32 --b 8 --batch 128 --device cpu --budget-gb 2
    python -m soupkit.experiments.plan --arch ViT-B-32-quickgelu --num-classes 1000 --k 72 --b 18 --device cuda

The prediction is the quantity ``make_soup`` reports as ``stats["peak_memory_bytes"]`` (the CUDA allocator's
peak, or the process's peak RSS on CPU, above the level at its start; for ``ensemble``, whose weights are
only read when it is evaluated, the peak of computing its held-out logits). It is a sum of copies of the
weights that the code holds at once, read from the implementations (``methods/registry.py``, ``methods/learned.py``,
``methods/hyperplane.py``, ``engine/loop.py``, ``pool/checkpoint_pool.py``), plus the activations of one forward/backward. Units: bytes throughout.

* ``M``: one model's state dict in the compute ``dtype`` (the forward's keys; integer buffers as they are);
  ``D``: one direction row of HL/MEHL, the mixed (floating) tensors in ``direction_dtype``; ``T``: the largest
  tensor of the model.
* ``R``: what reading one checkpoint adds beside the model it yields: 0 for files, which are memory-mapped
  (safetensors' default ``mmap`` backend, zip ``.pt``; the mapped pages ARE the tensors, measured: a read
  model costs its file size in RSS), and for state dicts already in memory; ``M`` where a read copies
  (``checkpoint_format="copy"``, e.g. a cast to another dtype). HL/MEHL read directions tensor by tensor.
* ``A(B)``: activations of one forward + backward at data batch ``B`` (the autograd graph's saved tensors,
  the gradients flowing back through it, one parameter tensor's gradient); ``F(B)``: peak of one no-grad
  forward; ``Z``: the held-out logits that best/greedy/ensemble collect (``2·N·C·4``: the list and its
  ``torch.cat``). Both activation terms are MEASURED: :func:`measure_activations` runs one forward/backward of
  the model on CPU at two small batches, counts the bytes of every tensor the operators allocate while it is
  alive (a ``TorchDispatchMode``: the allocator's live bytes, not RSS) and fits ``a0 + a1·B``; the planner
  extrapolates linearly to the batch asked for. (Not an analytic ViT estimate: the same helper serves any
  architecture; pass an :class:`ActivationModel` to use numbers measured elsewhere, e.g. on the GPU.)
* ``G``: Learned-Soup's graph over K models: ``K·n·g`` for the model's n tensors, ``g`` the host objects of
  one (model, tensor) pair (coefficient view, multiply and add nodes, the read tensor's object; 5 KiB measured
  on this CPU): nothing at ViT-B/32 scale (K = 72: 55 MB beside 24 GB), a tenth of the tiny zoo's models.
* ``C0``: the runtime's own one-time allocations at the first backward of a process (autograd engine,
  oneDNN/MKL scratch), measured on this CPU by ``benchmarks/plan_check.py``; 0 on CUDA (its context is not
  counted by ``max_memory_allocated``).
* ``H``: the host heap the baselines grow beside their tensors (the pool's per-model records and checks,
  safetensors headers, Python objects: allocations below glibc's mmap threshold), measured on this CPU by
  ``benchmarks/plan_check.py`` with 4 KiB pages: 0.3-1.1 MB over the baselines and K = 4-32, taken as a constant
  0.8 MB; 0 on CUDA (host memory). The learned methods' share of it is inside their fitted ``C0``.

Per method (CPU; on CUDA the HL/MEHL centre lives in host memory, see :data:`FORMULAS`)::

    best           max(M + R, M + F, 2M) + Z + H         one model at a time, then the chosen one cloned
    uniform        2M + R + H                            running sum + the model being read
    greedy         max(2M + R, 3M + F) + Z + H           running sum, candidate model, candidate soup
    ensemble       max(M + R, M + F) + Z + H             members read one at a time (at evaluation)
    learned(+)     (K + 1)M + G + A + C0                 all K models + the combined model, one graph
    hl(+)          max(2M + R, 2M + K·D + A + C0)        centre, soup, the K directions
    mehl(+)        max(2M + R, 2M + b·D + A + C0)        centre, soup, b directions (prefetch: 2b)
    mehl+released  max(4M + R, M + b·D + b·T + A + C0)   basin pass beside the first block's centre; the
                                                         soup is the centre; per-layer norms of the block

The model module itself (its own weights, the held-out data) is resident before ``make_soup`` starts and is
not part of the prediction: compare it with the FREE memory at that point (:func:`device_budget`).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from soupkit.config import parse_dtype
from soupkit.errors import PlanError, SoupkitError
from soupkit.zoo.base import BaseZoo, image_input_shape

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ModelSize", "ActivationModel", "Plan", "FORMULAS", "model_size", "measure_activations",
           "plan_memory", "plan_all", "plan_table", "fit_verdict", "device_budget", "main", "CPU_RUNTIME_BYTES",
           "CPU_HEAP_BYTES", "PLAN_TOLERANCE"]

# C0 above: measured with benchmarks/plan_check.py on this repository's CPU (torch 2.13 CPU build, 1 thread)
CPU_RUNTIME_BYTES = 5 * 2**20
# H above: measured likewise (plan_check.py, 4 KiB pages); host memory, so 0 on CUDA
CPU_HEAP_BYTES = int(0.8 * 2**20)
# how far a CPU prediction may be from the measured peak (benchmarks/plan_check.py checks every method against it)
PLAN_TOLERANCE = 0.15
# G above: host objects per (model, tensor) pair of Learned-Soup's graph (a coefficient view, a multiply and an
# add node, the read tensor's own object), measured likewise; not device memory on CUDA
CPU_GRAPH_BYTES_PER_PAIR = 5 * 2**10

_PLANNED = ("best", "uniform", "greedy", "ensemble", "learned", "learned+", "hl", "hl+", "mehl", "mehl+",
            "mehl+released")

FORMULAS: dict[str, str] = {
    "best": "max(M + R, M + F, 2M) + Z + H",
    "uniform": "2M + R + H",
    "greedy": "max(2M + R, 3M + F) + Z + H",
    "ensemble": "max(M + R, M + F) + Z + H",
    "learned": "(K + 1)M + G + A + C0",
    "learned+": "(K + 1)M + G + A + C0",
    "hl": "max(2M + R, 2M + K·D + A + C0)",
    "hl+": "max(2M + R, 2M + K·D + A + C0)",
    "mehl": "max(2M + R, 2M + b·D + A + C0)",
    "mehl+": "max(2M + R, 2M + b·D + A + C0)",
    "mehl+released": "max(4M + R, M + b·D + b·T + A + C0)",
}
_CUDA_FORMULAS = {  # the centre is moved to host memory once the soup is cloned from it (methods/hyperplane.py)
    "hl": "max(2M, M + K·D + A)", "hl+": "max(2M, M + K·D + A)",
    "mehl": "max(2M, M + b·D + A)", "mehl+": "max(2M, M + b·D + A)",
    "mehl+released": "max(3M, M + b·D + b·T + A)",
}


# ---- sizes -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSize:
    """What the planner needs to know of an architecture, in elements (not bytes).

    Attributes:
        floating: floating elements of the forward's tensors (parameters + floating buffers) = one direction.
        integer_bytes: bytes of the integer tensors (e.g. BatchNorm's ``num_batches_tracked``), not cast.
        largest: elements of the largest floating tensor.
        tensors: number of tensors in the state dict.
        num_parameters: parameter elements (for the table only).
        num_classes: classes of the head (for the logits term).
    """

    floating: int
    integer_bytes: int = 0
    largest: int = 0
    tensors: int = 0
    num_parameters: int = 0
    num_classes: int = 0

    def model_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """``M``: one model in ``dtype``."""
        return self.floating * _itemsize(dtype) + self.integer_bytes


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def model_size(model: nn.Module, num_classes: int | None = None) -> ModelSize:
    """:class:`ModelSize` of ``model`` from its state dict (tied tensors counted once, as the soup holds them)."""
    from soupkit.engine.layers import layer_map  # noqa: PLC0415

    layers = layer_map(model, layerwise=False)
    state = model.state_dict()
    floating = [state[k] for k in layers.mixed]
    if num_classes is None:
        head = [m for m in model.modules() if isinstance(m, nn.Linear)]
        num_classes = head[-1].out_features if head else 0
    return ModelSize(floating=sum(t.numel() for t in floating),
                     integer_bytes=sum(state[k].numel() * state[k].element_size() for k in layers.fixed),
                     largest=max((t.numel() for t in floating), default=0), tensors=len(layers.forward_keys),
                     num_parameters=sum(p.numel() for p in model.parameters()), num_classes=num_classes)


# ---- activations -----------------------------------------------------------------------------------------------
class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages the operators allocate while they are alive; ``peak`` is their maximum.

    An operator's output that shares storage with one of its inputs (a view, an in-place op) allocates
    nothing and is not counted; a storage is uncounted when it is freed (a finalizer on its Python object,
    which torch keeps alive as long as the storage lives).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, Any] = {}

    def _freed(self, ptr: int, nbytes: int) -> None:
        self.current -= nbytes
        self._live.pop(ptr, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self._live:
                continue
            self._live[ptr] = weakref.finalize(storage, self._freed, ptr, nbytes)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


@dataclass(frozen=True)
class ActivationModel:
    """Activation bytes linear in the data batch B: ``train(B) = train_fixed + train_per_sample·B`` (one
    forward + backward with gradients w.r.t. the weights, each freed once produced, as HL/MEHL do) and
    ``eval(B)`` likewise for one no-grad forward. ``source`` says where the numbers come from."""

    train_fixed: float
    train_per_sample: float
    eval_fixed: float = 0.0
    eval_per_sample: float = 0.0
    source: str = "given"

    def train(self, batch: int) -> int:
        return int(round(max(0.0, self.train_fixed + self.train_per_sample * batch)))

    def eval(self, batch: int) -> int:
        return int(round(max(0.0, self.eval_fixed + self.eval_per_sample * batch)))


def _one_pass(model: nn.Module, state: Mapping[str, Tensor], x: Tensor, y: Tensor, train: bool) -> int:
    """Peak live bytes of one forward (+ backward when ``train``) of ``model`` with weights ``state``."""
    from torch.func import functional_call  # noqa: PLC0415

    params = {n for n, _ in model.named_parameters()}
    leaves = {k: v.detach().requires_grad_(True) for k, v in state.items() if k in params and v.is_floating_point()}
    for leaf in leaves.values():  # HL/MEHL free each tensor's gradient as soon as backward produces it
        leaf.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))
    meter = _LiveBytes()
    with meter:
        if train:
            logits = functional_call(model, {**state, **leaves}, (x,))
            nn.functional.cross_entropy(logits.float(), y).backward()
            del logits
        else:
            with torch.no_grad():
                functional_call(model, dict(state), (x,))
    return meter.peak


def measure_activations(model: nn.Module, input_shape: Sequence[int], batches: tuple[int, int] = (2, 8),
                        dtype: torch.dtype = torch.float32, num_classes: int | None = None) -> ActivationModel:
    """Measure ``A(B)`` and ``F(B)`` of ``model`` on CPU at two small batches and fit a line through them.

    Args:
        model: the classifier (its weights are used, not modified); ``x [B, *input_shape] -> logits [B, C]``.
        input_shape: one input without the batch dimension, e.g. ``(3, 224, 224)``.
        batches: the two batch sizes measured (small: the ViT-B/32 at 8 takes a few seconds on 2 cores).
        dtype: the dtype the soup runs in.

    Returns:
        an :class:`ActivationModel` in bytes, ``source`` naming the batches measured.
    """
    from soupkit.engine.evaluation import eval_mode  # noqa: PLC0415

    lo, hi = sorted(batches)
    if lo < 1 or hi <= lo:
        raise PlanError(f"measure_activations needs two batch sizes 1 <= b1 < b2, got {batches}")
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()) for k, v in model.state_dict().items()}
    c = num_classes or model_size(model).num_classes or 1
    gen = torch.Generator().manual_seed(0)
    points: dict[bool, list[int]] = {True: [], False: []}
    with eval_mode(model):
        for b in (lo, hi):
            x = torch.randn((b, *input_shape), generator=gen).to(dtype)
            y = torch.randint(0, c, (b,), generator=gen)
            for train in (True, False):
                points[train].append(_one_pass(model, state, x, y, train))
    slope = {t: (points[t][1] - points[t][0]) / (hi - lo) for t in points}
    return ActivationModel(train_fixed=points[True][0] - slope[True] * lo, train_per_sample=slope[True],
                           eval_fixed=points[False][0] - slope[False] * lo, eval_per_sample=slope[False],
                           source=f"measured on CPU at batch {lo} and {hi}, linear in the batch")


# ---- the plan --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Predicted peak memory of one method.

    Attributes:
        peak_bytes: the prediction (what ``make_soup`` would report as ``peak_memory_bytes``).
        terms: the formula's quantities in bytes (``M``, ``D``, ``A``, ...) and the counts (``K``, ``b``).
        formula: the method's formula in those terms.
        budget_bytes: the memory it is compared with (None: not compared).
        fits: ``peak_bytes <= budget_bytes`` (None without a budget).
    """

    method: str
    device: str
    k: int
    b: int
    batch: int
    peak_bytes: int
    formula: str
    terms: dict[str, int] = field(default_factory=dict)
    budget_bytes: int | None = None
    fits: bool | None = None

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def _family(method: str) -> str:
    """The method's family in the registry (``"mehl"`` for mehl, mehl+ and mehl+released; ``"hl"``, ``"learned"``...)."""
    from soupkit.methods.registry import METHODS  # noqa: PLC0415  (the registry imports every method)

    return METHODS[method].family


def _resolve_b(method: str, k: int, b: int | None) -> int:
    """b as ``hyperplane_soup`` resolves it: HL uses all K; MEHL ``model_batch_size`` or ceil(K/4), at most K."""
    family = _family(method)
    if family in ("hl", "learned"):  # every model at once
        return k
    if family != "mehl":
        return 1
    if b is not None and b < 1:
        raise PlanError(f"b (model_batch_size) must be >= 1, got {b}")
    return min(k, b if b is not None else math.ceil(k / 4))


def plan_memory(method: str, model: nn.Module | ModelSize, k: int, *, b: int | None = None, batch: int = 128,
                activations: ActivationModel | None = None, input_shape: Sequence[int] | None = None,
                dtype: torch.dtype = torch.float32, direction_dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu", checkpoint_format: str = "safetensors",
                heldout: int = 0, eval_batch: int | None = None, prefetch: bool = False,
                budget_bytes: int | None = None, runtime_bytes: int | None = None,
                heap_bytes: int | None = None) -> Plan:
    """Predict the peak memory of ``make_soup(method, ...)`` over K models (see the module docstring).

    Args:
        method: one of ``soupkit.METHODS``.
        model: the architecture (a module, sized with :func:`model_size`), or its :class:`ModelSize`.
        k: models in the pool (K >= 1). b: MEHL's ``model_batch_size`` (default ceil(K/4), clamped to K).
        batch: held-out examples per learning step (``batch_size``, or the loader's batches).
        activations: ``A``/``F`` of the architecture; measured with :func:`measure_activations` (needs a module
            and ``input_shape``) when None.
        dtype: the ``dtype`` option (what the models are combined in); direction_dtype: HL/MEHL's.
        device: ``"cpu"`` or ``"cuda[:i]"``: which formula applies and which budget is meant.
        checkpoint_format: ``"safetensors"``, ``"pt"``, ``"memory"`` (state dicts; all ``R = 0``) or ``"copy"``
            (reads that copy the model, e.g. a dtype cast: ``R = M``).
        heldout: held-out examples the baselines score (for ``Z``); eval_batch: their batch (default ``batch``).
        prefetch: HL/MEHL read the next block while one trains (``2b`` directions).
        budget_bytes: memory available when make_soup starts; sets ``fits``.
        runtime_bytes: ``C0`` (default :data:`CPU_RUNTIME_BYTES` on CPU, 0 on CUDA).
        heap_bytes: ``H`` (default :data:`CPU_HEAP_BYTES` on CPU, 0 on CUDA).

    Raises:
        PlanError: unknown method, K < 1, b < 1, batch < 1, a module without ``input_shape``.
    """
    if method not in _PLANNED:
        raise PlanError(f"unknown soup method {method!r}; choose from {', '.join(_PLANNED)}")
    if k < 1:
        raise PlanError(f"K must be >= 1, got {k}")
    if batch < 1:
        raise PlanError(f"batch must be >= 1, got {batch}")
    if checkpoint_format not in ("safetensors", "pt", "memory", "copy"):
        raise PlanError("checkpoint_format must be 'safetensors', 'pt', 'memory' or 'copy', "
                        f"got {checkpoint_format!r}")
    dev = torch.device(device)
    size = model if isinstance(model, ModelSize) else model_size(model)
    if activations is None:
        if isinstance(model, ModelSize) or input_shape is None:
            raise PlanError("give activations=ActivationModel(...) or a module with input_shape to measure them")
        activations = measure_activations(model, input_shape, dtype=dtype, num_classes=size.num_classes)
    bb = _resolve_b(method, k, b)
    cuda = dev.type == "cuda"
    m = size.model_bytes(dtype)
    d = size.floating * _itemsize(direction_dtype or dtype)
    t = size.largest * _itemsize(dtype)
    r = m if checkpoint_format == "copy" else 0
    a = activations.train(batch)
    f = activations.eval(eval_batch or batch)
    z = 2 * heldout * size.num_classes * 4
    c0 = (CPU_RUNTIME_BYTES if not cuda else 0) if runtime_bytes is None else runtime_bytes
    h = (CPU_HEAP_BYTES if not cuda else 0) if heap_bytes is None else heap_bytes
    g = 0 if cuda else k * size.tensors * CPU_GRAPH_BYTES_PER_PAIR
    blocked = prefetch and _family(method) == "mehl"  # MEHL prefetches the next block beside the current one
    rows = 2 * bb if blocked else bb
    if method == "best":
        peak = max(m + r, m + f, 2 * m) + z + h
    elif method == "uniform":
        peak = 2 * m + r + h
    elif method == "greedy":
        peak = max(2 * m + r, 3 * m + f) + z + h
    elif method == "ensemble":
        peak = max(m + r, m + f) + z + h
    elif method in ("learned", "learned+"):
        peak = (k + 1) * m + g + a + c0
    elif method == "mehl+released":
        peak = max((3 if cuda else 4) * m + r, m + rows * d + rows * t + a + c0)
    else:  # hl, hl+, mehl, mehl+: centre + soup + directions; on CUDA the centre is in host memory
        peak = max(2 * m + r, (1 if cuda else 2) * m + rows * d + a + c0)
    formula = (_CUDA_FORMULAS if cuda else FORMULAS).get(method, FORMULAS[method])
    if blocked:
        formula = formula.replace("b·", "2b·")
    terms = {"M": m, "D": d, "T": t, "R": r, "A": a, "F": f, "Z": z, "G": g, "C0": c0, "H": h, "K": k, "b": bb}
    fits = None if budget_bytes is None else peak <= budget_bytes
    return Plan(method, str(dev), k, bb, batch, int(peak), formula, terms, budget_bytes, fits)


def plan_all(model: nn.Module | ModelSize, k: int, methods: Sequence[str] = _PLANNED, **options: Any) -> list[Plan]:
    """:func:`plan_memory` of every method in ``methods`` (activations measured once)."""
    if options.get("activations") is None and not isinstance(model, ModelSize):
        if options.get("input_shape") is None:
            raise PlanError("give activations=ActivationModel(...) or input_shape to measure them")
        options["activations"] = measure_activations(model, options["input_shape"],
                                                     dtype=options.get("dtype", torch.float32))
    return [plan_memory(name, model, k, **options) for name in methods]


def device_budget(device: str | torch.device, cap_bytes: int | None = None) -> tuple[int | None, str]:
    """``(bytes, where they come from)``: ``cap_bytes`` when given; else CUDA's free memory
    (``torch.cuda.mem_get_info``) or, on CPU, ``MemAvailable`` of ``/proc/meminfo``; ``(None, why)`` if unknown."""
    if cap_bytes is not None:
        return int(cap_bytes), "given cap"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None, "CUDA not available here"
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free), f"free memory of {dev} now"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable of this machine now"
    except OSError:
        pass
    return None, "unknown (give --budget-gb)"


# ---- a zoo's runs ----------------------------------------------------------------------------------------------
def _record_options(record: Mapping[str, Any]) -> dict[str, Any]:
    """The planner's options for the run a record (``soupkit.experiments.run``) describes."""
    options = dict(record.get("options") or {})
    heldout = record.get("heldout_size") or 0  # None: the whole split, unknown here; Z is small beside M
    heldout -= int(round((record.get("select_fraction") or 0.0) * heldout))  # the select part is not learned on
    b = options.get("model_batch_size", record.get("model_batch_size"))
    ddtype = options.get("direction_dtype")
    return {"b": None if b is None or b != b else int(b), "batch": int(record.get("batch_size") or 128),
            "heldout": int(heldout), "device": str(record.get("device") or "cpu"),
            "prefetch": bool(options.get("prefetch", False)),
            "direction_dtype": parse_dtype(ddtype, "direction_dtype", error=PlanError) if ddtype else None}


def fit_verdict(peak_bytes: int, budget_bytes: int | None, tolerance: float = PLAN_TOLERANCE) -> str:
    """What a prediction says about a budget, given the planner's accuracy: "fits" (``peak·(1 + tolerance)`` within
    the budget), "does not fit" (``peak·(1 - tolerance)`` above it), else "borderline"; "no cap" without a budget."""
    if budget_bytes is None:
        return "no cap"
    if peak_bytes * (1 + tolerance) <= budget_bytes:
        return "fits"
    return "does not fit" if peak_bytes * (1 - tolerance) > budget_bytes else "borderline"


def plan_table(zoo: BaseZoo, records: Sequence[Mapping[str, Any]], activations: ActivationModel | None = None,
               tolerance: float = PLAN_TOLERANCE) -> pd.DataFrame:
    """The planner's predicted peak of each run in ``records`` beside its memory cap and what the run did.

    ``records`` are ``soupkit.experiments.run.run_methods``'s (one per method: ``method``, ``status``,
    ``peak_memory_bytes``, ``memory_cap_mb``, ``num_models``, ``batch_size``, ``heldout_size``, ``options``...);
    each is planned with the options it ran with, K its ``num_models``, on the zoo's architecture (activations
    measured once, unless given). Columns: ``method``, ``predicted peak (MB)``, ``cap (MB)``, ``plan``
    (:func:`fit_verdict` at ``tolerance``, or "no formula" for a method the planner does not know), ``run`` (the
    record's status) and ``measured peak (MB)`` (a stopped run's: where it was stopped).
    """
    import pandas as pd  # noqa: PLC0415  (the command line does not need it)

    model = zoo.make_model()
    size = model_size(model)
    rows = []
    for record in records:
        method, cap = str(record["method"]), record.get("memory_cap_mb") or None
        measured = record.get("peak_memory_bytes")
        row = {"method": method, "predicted peak (MB)": None, "cap (MB)": cap, "plan": "no formula",
               "run": record.get("status"),
               "measured peak (MB)": None if measured is None or measured != measured else measured / 2**20}
        if method in _PLANNED:
            if activations is None:  # measured only when a method is planned
                activations = measure_activations(model, zoo.input_shape(model), num_classes=size.num_classes)
            p = plan_memory(method, size, int(record.get("num_models") or len(zoo.records)),
                            activations=activations, budget_bytes=None if cap is None else int(cap * 2**20),
                            **_record_options(record))
            row.update({"predicted peak (MB)": p.peak_mb, "plan": fit_verdict(p.peak_bytes, p.budget_bytes, tolerance)})
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", "predicted peak (MB)", "cap (MB)", "plan", "run",
                                       "measured peak (MB)"])


# ---- command line ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one sentence, not the usage block
        print(f"soupkit.experiments.plan: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m soupkit.experiments.plan",
                                description="Predict each soup method's peak memory and whether it fits.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--zoo", help="embedded zoo directory (its architecture; K defaults to its size)")
    src.add_argument("--arch", help="open_clip architecture, e.g. ViT-B-32-quickgelu (random weights, offline)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the head (--arch)")
    p.add_argument("--k", type=int, help="models in the pool (default: the zoo's; required with --arch)")
    p.add_argument("--b", type=int, help="MEHL model_batch_size (default ceil(K/4))")
    p.add_argument("--batch", type=int, default=128, help="held-out examples per learning step")
    p.add_argument("--heldout", type=int, default=0, help="held-out examples the baselines score (logits term)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="float32", help="the soup's dtype (float32, bfloat16, float16)")
    p.add_argument("--direction-dtype", help="HL/MEHL direction dtype (default: --dtype)")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "pt", "memory", "copy"],
                   dest="checkpoint_format", help="how the checkpoints are stored")
    p.add_argument("--prefetch", action="store_true", help="HL/MEHL prefetch option")
    p.add_argument("--budget-gb", type=float, help="memory available (GiB); default: free memory of the device")
    p.add_argument("--activation-mb-per-sample", type=float,
                   help="skip measuring: activations of one forward/backward per example (MiB)")
    p.add_argument("--methods", nargs="+", default=list(_PLANNED), help="methods to plan (default all)")
    return p


def _model_and_shape(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, ...], int | None, int]:
    """(module, one input's shape, K of the zoo or None, held-out size of the zoo or 0)."""
    if args.zoo is not None:
        from soupkit.zoo.sources import open_zoo  # noqa: PLC0415

        if not Path(args.zoo).is_dir():
            raise PlanError(f"--zoo {args.zoo}: no such directory")
        try:
            zoo = open_zoo(args.zoo)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise PlanError(f"--zoo {args.zoo}: not a readable zoo ({err})") from None
        model = zoo.make_model()
        return model, zoo.input_shape(model), len(zoo.records), 0
    from soupkit.runtime._compat import import_open_clip  # noqa: PLC0415

    open_clip = import_open_clip()
    if open_clip.get_model_config(args.arch) is None:
        raise PlanError(f"--arch {args.arch!r} is not an open_clip architecture "
                        "(open_clip.list_models() lists them)")
    from soupkit.zoo.clip import build_model_soups_model  # noqa: PLC0415

    model = build_model_soups_model(args.num_classes, args.arch)  # random weights: nothing is downloaded
    return model, image_input_shape(model), None, 0


_TERM = re.compile(r"(?<![A-Za-z])(C0|M|D|T|R|A|F|Z|G|H)(?![A-Za-z0-9])")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def format_table(plans: Sequence[Plan]) -> str:
    """The plans as a text table: method, predicted peak (MB), fits, formula and its terms in MB."""
    lines = [f"{'method':14s} {'peak MB':>10s} {'fits':>5s}  formula (terms in MB)"]
    for p in plans:
        fits = "-" if p.fits is None else ("yes" if p.fits else "no")
        used = list(dict.fromkeys(_TERM.findall(p.formula)))
        shown = ", ".join(f"{n}={_mb(p.terms[n])}" for n in used)
        counts = f"K={p.terms['K']}" + (f", b={p.terms['b']}" if "b" in p.formula else "")
        lines.append(f"{p.method:14s} {p.peak_mb:10.1f} {fits:>5s}  {p.formula}  [{counts}; {shown}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m soupkit.experiments.plan``: print the table; 0 on success, 2 with one sentence on a bad argument."""
    p = _parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as stop:  # argparse printed its one-line usage error (or --help)
        return int(stop.code or 0)
    try:
        unknown = [m for m in args.methods if m not in _PLANNED]
        if unknown:
            raise PlanError(f"unknown soup method {unknown[0]!r}; choose from {', '.join(_PLANNED)}")
        dtype = parse_dtype(args.dtype, "--dtype", floating=True, error=PlanError)
        ddtype = (parse_dtype(args.direction_dtype, "--direction-dtype", floating=True, error=PlanError)
                  if args.direction_dtype else None)
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise PlanError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1)") from None
        for name in ("k", "b", "batch"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise PlanError(f"--{name} must be >= 1, got {value}")
        if args.heldout < 0:
            raise PlanError(f"--heldout must be >= 0, got {args.heldout}")
        if args.budget_gb is not None and args.budget_gb <= 0:
            raise PlanError(f"--budget-gb must be > 0, got {args.budget_gb}")
        if args.arch is not None and args.k is None:
            raise PlanError("--arch needs --k (the number of models in the pool)")
        model, shape, zoo_k, _ = _model_and_shape(args)
        k = args.k or zoo_k
        size = model_size(model, args.num_classes if args.arch else None)
        if args.activation_mb_per_sample is not None:
            per = args.activation_mb_per_sample * 2**20
            acts = ActivationModel(0.0, per, 0.0, per / 4, source="given per example (eval: a quarter of it)")
        else:
            acts = measure_activations(model, shape, dtype=dtype, num_classes=size.num_classes)
        budget, where = device_budget(dev, int(args.budget_gb * 2**30) if args.budget_gb else None)
        plans = [plan_memory(m, size, k, b=args.b, batch=args.batch, activations=acts, dtype=dtype,
                             direction_dtype=ddtype, device=dev, checkpoint_format=args.checkpoint_format,
                             heldout=args.heldout, prefetch=args.prefetch, budget_bytes=budget)
                 for m in args.methods]
    except SoupkitError as err:  # PlanError, and a zoo whose checkpoints cannot be read
        print(f"soupkit.experiments.plan: {err}", file=sys.stderr)
        return 2
    what = args.zoo or args.arch
    print(f"{what}: {size.num_parameters / 1e6:.2f} M parameters, M = {_mb(size.model_bytes(dtype))} MB per model "
          f"({str(dtype).replace('torch.', '')}), K = {k}, batch {args.batch}, device {dev}")
    print(f"activations: {acts.source}: A({args.batch}) = {_mb(acts.train(args.batch))} MB")
    print(f"budget: " + (f"{_mb(budget)} MB ({where})" if budget is not None else where))
    print(format_table(plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
