"""The one optimisation loop of every learned soup, and the two parameterisations it optimises.

Each outer iteration optimises the coefficients ``w`` of one *block* of models with AdamW for T inner steps
(:func:`optimise`), then folds them into the soup. What differs between methods is the space ``w`` lives in:

* :class:`SimplexSpace` (Learned-Soup, Wortsman et al.): θ_l = Σ_i softmax(w)_{i,l} θ_{i,l} over ALL K
  resident models; the gradient is autograd through that combination (one graph over K models).
* :class:`HyperplaneSpace` (HL-Soup, MEHL-Soup): θ_l(w) = soup_l + Σ_{i∈B} (w − w0)_{i,l} D_{i,l} with
  directions D_i = θ_i − θ̄; the gradient is ∂L/∂w_{i,l} = ⟨∇_{θ_l} L(θ(w)), D_{i,l}⟩ from one backward
  pass of the combined model. HL is one block of all K models; MEHL draws blocks of b models.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from soupkit.config import SoupConfig
from soupkit.engine import directions
from soupkit.engine.batches import BatchStream
from soupkit.engine.evaluation import accuracy, eval_mode, predict
from soupkit.engine.heldout import check_labels
from soupkit.engine.layers import LayerMap
from soupkit.engine.schedule import warmup_cosine
from soupkit.errors import DivergenceError
from soupkit.runtime.distributed import Communicator

__all__ = ["SimplexSpace", "HyperplaneSpace", "optimise", "lr_lambda"]

StateDict = dict[str, Tensor]


def lr_lambda(steps: int, warmup: float, schedule: str) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step s: linear warm-up, then cosine to 0 (or constant)."""
    warm = int(round(warmup * steps))
    return lambda s: warmup_cosine(s, steps, warm, constant=schedule == "constant")


class _Monitor:
    """The checks that would cost a device sync every step, kept on the device and read every ``every`` steps.

    Per step it keeps the loss and whether ∂L/∂w is finite (host: nothing); on an accelerator the labels' range
    too (a label out of range is clamped for the loss, so it cannot become a device-side assert, and reported
    at the next :meth:`flush`). On the CPU labels are checked at once, as reading them costs no sync.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.losses: list[Tensor] = []
        self.finite: list[Tensor] = []
        self.first = 0  # inner step of losses[0]
        self.range: tuple[Tensor, Tensor, int] | None = None  # (min, max) of the labels seen, classes

    def labels(self, y: Tensor, logits_shape: torch.Size) -> Tensor:
        """``y``, checked now on the CPU; on an accelerator its range recorded and ``y`` clamped into it."""
        c = int(logits_shape[-1])
        plain = y.dim() == 1 and not y.is_floating_point() and y.dtype != torch.bool and len(y) == logits_shape[0]
        if y.device.type == "cpu" or not plain or not y.numel():
            check_labels(y if y.device.type == "cpu" or plain else y.cpu(), logits_shape)
            return y
        lo, hi = y.min(), y.max()
        if self.range is not None:
            lo, hi = torch.minimum(lo, self.range[0]), torch.maximum(hi, self.range[1])
        self.range = (lo, hi, c)
        return y.clamp(0, c - 1)

    def record(self, loss: Tensor, grad: Tensor) -> None:
        self.losses.append(loss.detach().float().reshape(()))
        self.finite.append(torch.isfinite(grad).all())

    def flush(self, history: list[float], on_step: Callable[[float], None] | None) -> None:
        """Read what was recorded (one sync); append the losses to ``history``; raise at the first bad step."""
        if self.range is not None:
            lo, hi, c = int(self.range[0]), int(self.range[1]), self.range[2]
            self.range = None
            check_labels(torch.tensor([lo, hi]), (2, c), what="held-out batches since the last check")
        if not self.losses:
            return
        losses = torch.stack(self.losses).tolist()
        finite = torch.stack(self.finite).tolist()
        first, self.losses, self.finite = self.first, [], []
        self.first += len(losses)
        for i, (value, ok) in enumerate(zip(losses, finite)):
            if not ok or not math.isfinite(value):
                raise DivergenceError(f"non-finite loss/gradient at inner step {first + i} (loss {value}); "
                                      "lower lr or add clip_grad_norm; no soup was written")
            history.append(value)
            if on_step is not None:
                on_step(value)


def _cross_entropy(model: nn.Module, state: Mapping[str, Tensor], x: Tensor, y: Tensor, scale: Tensor | None,
                   autocast: torch.dtype | None = None, monitor: _Monitor | None = None) -> Tensor:
    """Mean cross-entropy of ``model`` with weights ``state``; the forward under ``torch.autocast`` if given."""
    with torch.autocast(x.device.type, dtype=autocast) if autocast is not None else nullcontext():
        logits = functional_call(model, dict(state), (x,))
    if monitor is not None:
        y = monitor.labels(y, logits.shape)
    else:
        check_labels(y, logits.shape)  # every batch: an out-of-range label is a device-side assert on CUDA
    if scale is not None:
        logits = logits * scale
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the loss in full precision for half-precision soups and autocast
    return nn.functional.cross_entropy(logits, y)


def _coefficient(w: Tensor, g: int) -> Tensor:
    """Column ``g`` of ``w [m, L]``; -1 (a buffer without a parameter) is the mean over layers."""
    return w[:, g] if g >= 0 else w.mean(dim=1)


def _data_and_model(comm: Communicator | None) -> tuple[Communicator | None, Communicator | None]:
    """``comm`` as (data-parallel, model-parallel) communicator; None where it does not apply."""
    if comm is None or comm.world_size == 1:
        return None, None
    return (comm, None) if comm.mode == "data" else (None, comm)


class SimplexSpace:
    """Learned-Soup: softmax coefficients, autograd through the combination of all K resident models.

    With a data-parallel ``comm`` the batch is this rank's part of the global batch, and the gradients of the
    logits (and of the logit scale) are averaged over the ranks before the clip.
    """

    def __init__(self, model: nn.Module, models: list[StateDict], layers: LayerMap, logit_scale: bool,
                 clip_grad_norm: float | None = None, comm: Communicator | None = None, *,
                 autocast: torch.dtype | None = None) -> None:
        self.comm, model_comm = _data_and_model(comm)
        if model_comm is not None:
            raise ValueError("Learned-Soup combines all K models in one graph: use parallel='data' "
                             "(parallel='model' splits the models of HL/MEHL)")
        self.model, self.models, self.layers = model, models, layers
        self.fixed = {k: models[0][k] for k in layers.fixed}
        device = next(iter(models[0].values())).device
        self.scale = nn.Parameter(torch.ones((), device=device)) if logit_scale else None
        self.extra = [self.scale] if self.scale is not None else []
        self.clip = clip_grad_norm
        self.w0 = torch.zeros(len(models), len(layers), device=device)  # softmax(0) = the uniform soup
        self.autocast = autocast
        self.monitor: _Monitor | None = None  # set by optimise()

    def _combine(self, p: Tensor, keys: Iterable[str]) -> StateDict:
        # model-soups' own formulation: a Python sum of K scaled copies per tensor, all kept in the graph
        return {k: sum(p[i, self.layers.group[k]] * m[k] for i, m in enumerate(self.models)) for k in keys}

    def state(self, w: Tensor) -> StateDict:
        with torch.no_grad():
            p = torch.softmax(w, dim=0)
            p = torch.cat([p, p.mean(dim=1, keepdim=True)], dim=1)  # column -1: buffers without a layer
            return {**self._combine(p, self.layers.mixed), **self.fixed}

    def loss(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        if len(y):
            p = torch.softmax(w, dim=0)
            theta = self._combine(p, self.layers.trainable)
            with torch.no_grad():
                pb = torch.cat([p, p.mean(dim=1, keepdim=True)], dim=1)
                theta.update(self._combine(pb, self.layers.buffers))
            loss = _cross_entropy(self.model, {**theta, **self.fixed}, x, y, self.scale, self.autocast, self.monitor)
            loss.backward()
        else:  # this rank's part of a global batch with fewer rows than ranks: it adds nothing
            loss = torch.zeros((), device=w.device)
            for param in (w, *self.extra):
                param.grad = torch.zeros_like(param)
        if self.comm is not None:
            loss = self.comm.all_reduce_mean_([w.grad, *(p.grad for p in self.extra)], len(y), loss)
        if self.clip is not None:
            nn.utils.clip_grad_norm_([w], self.clip)
        return loss.detach()

    def coefficients(self, w: Tensor) -> Tensor:
        return torch.softmax(w.detach(), dim=0)


def _consume(products: Tensor, sq: Tensor, j: int, d: Tensor, g: Tensor, clip: bool, acc: torch.dtype) -> None:
    """Column ``j`` of ``products [b, T]``: ⟨g, D_i⟩ of the tensor's gradient ``g`` (and ``sq[j] = ‖g‖²``)."""
    products[:, j] = directions.inner(d, g)
    if clip:
        sq[j] = g.to(acc).pow(2).sum()


class HyperplaneSpace:
    """HL/MEHL: θ(w) = soup + Σ_i (w − w0)_i s_i D_i per layer; gradients are inner products with D_i.

    The combined model is kept as ONE set of tensors moved in place as ``w`` changes (one fused ``addmv`` per
    tensor, no copy per step), and the directions as one ``[b, P]`` buffer (``directions.py``). The gradient
    of each soup tensor is turned into its b inner products as soon as backward produces it and freed at
    once (a post-accumulate-grad hook), so the whole ∇θ is never held; a clip scales the ``[b, L]`` result
    by the factor that the norm of ∇θ (summed tensor by tensor) gives. Resident: the soup, the b directions,
    the activations and one tensor's gradient. Only data parallel with a clip holds ∇θ (its global norm
    needs the reduced ∇θ itself).

    Args:
        soup: the soup at ``w0``, canonical keys (mixed + fixed), each ``[*shape]``; owned and updated.
        stack: directions of the block, ``{mixed key: Tensor[b, *shape]}`` (from ``CheckpointPool.load_stack``:
            views of one buffer; any other dict is packed into one, a copy); with a model-parallel ``comm``
            only this rank's rows ``comm.rows(b)``: ``Tensor[b_r, *shape]``. May be held in a lower precision
            than the soup (bf16/fp16): products then accumulate in float32.
        w0: coefficients at which ``soup`` was formed, ``[b, L]``.
        scale: per-direction, per-layer factor ``[b, L]`` (1/‖D_{i,l}‖ for normalised directions).
        comm: data parallel: the batch is this rank's part, and the ``[b, L]`` gradient (with a clip: ∇θ) is
            averaged over the ranks; model parallel: soup moves and the gradient's rows are summed over ranks.
        autocast: run the forward under ``torch.autocast`` in this dtype (bf16/fp16); gradients stay in the
            soup's dtype.
    """

    def __init__(self, model: nn.Module, soup: StateDict, stack: StateDict, layers: LayerMap, w0: Tensor,
                 scale: Tensor | None = None, clip_grad_norm: float | None = None,
                 comm: Communicator | None = None, *, autocast: torch.dtype | None = None) -> None:
        self.data_comm, self.model_comm = _data_and_model(comm)
        self.rows = self.model_comm.rows(len(w0)) if self.model_comm is not None else slice(0, len(w0))
        held = {v.shape[0] for v in stack.values()}
        if held and held != {self.rows.stop - self.rows.start}:
            raise ValueError(f"the stack holds {sorted(held)} rows; rows {self.rows.start}:{self.rows.stop} of "
                             f"the block of {len(w0)} were expected")
        self.model, self.theta, self.layers = model, soup, layers
        self.stack = directions.pack(stack, layers.mixed) if layers.mixed else stack
        self.w0, self.applied = w0.detach().clone(), w0.detach().clone()
        self.scale = torch.ones_like(w0) if scale is None else scale
        self.fixed = {k: soup[k] for k in layers.fixed}
        self.flat = {k: self.stack[k].reshape(len(self.stack[k]), -1) for k in layers.mixed}  # [b, n_k] views
        self.clip = clip_grad_norm
        self.autocast = autocast
        self.monitor: _Monitor | None = None  # set by optimise()
        self.extra: list[nn.Parameter] = []
        device, b_own = w0.device, self.rows.stop - self.rows.start
        trainable = layers.trainable
        held_dtype = next(iter(self.stack.values())).dtype if self.stack else torch.float32
        acc = self.acc = torch.promote_types(torch.promote_types(held_dtype, w0.dtype), torch.float32)
        # [T, L] one-hot: the per-tensor products [b, T] summed into their layers by one matrix product
        self._to_layers = torch.zeros(len(trainable), len(layers), device=device, dtype=acc)
        for j, k in enumerate(trainable):
            self._to_layers[j, layers.group[k]] = 1.0
        self._products = torch.zeros(b_own, len(trainable), device=device, dtype=acc)  # ⟨∇θ_k L, D_{i,k}⟩, filled by hooks
        self._sq = torch.zeros(len(trainable), device=device, dtype=acc)  # ‖∇θ_k L‖², for the clip
        # the leaves alias the soup (moved in place), so they and their hooks are made once per block
        self.leaves = {k: self.theta[k].detach().requires_grad_(True) for k in trainable}
        for j, k in enumerate(trainable):
            self.leaves[k].register_post_accumulate_grad_hook(self._hook(j, k))

    def _hook(self, j: int, key: str) -> Callable[[Tensor], None]:
        # closes over tensors only, not over self: a cycle space → leaf → hook → space would keep the block's
        # directions alive after the block, until the garbage collector runs
        products, sq, d, clip, acc = self._products, self._sq, self.flat[key], self.clip is not None, self.acc

        def consume(leaf: Tensor) -> None:
            _consume(products, sq, j, d, leaf.grad, clip, acc)
            leaf.grad = None  # the gradient of this tensor is not kept
        return consume

    def _consume(self, j: int, key: str, g: Tensor) -> None:
        _consume(self._products, self._sq, j, self.flat[key], g, self.clip is not None, self.acc)

    def _delta(self, w: Tensor) -> Tensor:
        """``[b_r, L]``: how far each own direction moves from where the soup is now."""
        return ((w.detach() - self.applied) * self.scale)[self.rows].to(self.acc)

    def _move(self, target: StateDict, c: Tensor) -> None:
        """In place: ``target[k] += Σ_i c_{i,l(k)} D_{i,k}`` for every mixed key (summed over model-parallel ranks)."""
        if self.model_comm is None:
            for k in self.layers.mixed:
                directions.add_moved(target[k], self.flat[k], _coefficient(c, self.layers.group[k]))
            return
        own = ((k, directions.moved(self.flat[k], _coefficient(c, self.layers.group[k]), target[k]))
               for k in self.layers.mixed)
        for k, off in self.model_comm.summed(own):  # each rank's rows give part of the move, bucket by bucket
            target[k].add_(off)

    @torch.no_grad()
    def state(self, w: Tensor) -> StateDict:
        """θ(w) as new tensors; the soup itself is not moved."""
        out = {k: self.theta[k].clone() for k in self.layers.mixed}
        self._move(out, self._delta(w))
        return {**out, **self.fixed}

    @torch.no_grad()
    def move_to(self, w: Tensor) -> StateDict:
        """Move the soup to θ(w) in place and return it."""
        self._move(self.theta, self._delta(w))
        self.applied = w.detach().clone()
        return self.theta

    def loss(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        self.move_to(w)
        self._products.zero_()
        self._sq.zero_()
        hold = self.data_comm is not None and self.clip is not None  # the clip needs the global ∇θ itself
        state = {**self.theta, **self.leaves}
        if hold:
            if len(y):
                loss = _cross_entropy(self.model, state, x, y, None, self.autocast, self.monitor)
                grads = list(torch.autograd.grad(loss, list(self.leaves.values()), materialize_grads=True))
            else:  # this rank's part of a global batch with fewer rows than ranks: it adds nothing
                loss = torch.zeros((), device=w.device)
                grads = [torch.zeros_like(v) for v in self.leaves.values()]
            loss = self.data_comm.all_reduce_mean_(grads, len(y), loss)
            for j, (k, g) in enumerate(zip(self.leaves, grads)):
                self._consume(j, k, g)
            del grads
        elif len(y):
            loss = _cross_entropy(self.model, state, x, y, None, self.autocast, self.monitor)
            loss.backward()  # the hooks fill self._products (and self._sq) tensor by tensor
        else:  # this rank's part of a global batch with fewer rows than ranks: it adds nothing
            loss = torch.zeros((), device=w.device)
        gw = torch.zeros(w.shape, device=w.device, dtype=self.acc)
        gw[self.rows] = self._products @ self._to_layers  # ∂L/∂w_{i,l} = Σ_{k in l} ⟨∇θ_k L, D_{i,k}⟩
        if self.clip is not None:  # ⟨f·g, D⟩ = f·⟨g, D⟩: the clip factor scales the [b, L] product
            gw *= torch.clamp(self.clip / (self._sq.sum().sqrt() + 1e-6), max=1.0)
        if self.model_comm is not None:  # every rank filled its own rows: the sum is the whole gradient
            self.model_comm.all_reduce_sum_([gw])
        elif self.data_comm is not None and not hold:
            loss = self.data_comm.all_reduce_mean_([gw], len(y), loss)
        w.grad = (gw * self.scale).to(w.dtype)
        return loss.detach()


def optimise(space: "SimplexSpace | HyperplaneSpace", w_init: Tensor, batches: BatchStream, steps: int,
             cfg: SoupConfig, history: list[float], on_step: Callable[[float], None] | None = None) -> Tensor:
    """T = ``steps`` AdamW steps on ``w [m, L]`` (plus the space's extra parameters); returns the final ``w``.

    The host reads the losses (``history``, ``on_step``) and checks for NaN/Inf and bad labels every
    ``cfg.systems.sync_every`` steps, at early-stopping checks and at the end: no per-step device sync. A
    non-finite loss or gradient raises :class:`DivergenceError` naming its step, at most ``sync_every`` steps later.
    With ``cfg.run.select_loader`` the ``w`` with the best accuracy on it (checked every ``cfg.run.eval_every``
    steps and at the end) is returned instead of the last one.
    """
    algo, run, sync_every = cfg.algorithm, cfg.run, cfg.systems.sync_every
    w = nn.Parameter(w_init.detach().clone())
    opt = torch.optim.AdamW([w, *space.extra], lr=algo.lr, weight_decay=algo.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, algo.warmup, algo.schedule))
    best_acc, best_w = -1.0, w.detach().clone()
    monitor = space.monitor = _Monitor(sync_every)
    try:
        with eval_mode(space.model):
            for step in range(steps):
                x, y = batches.next()
                opt.zero_grad(set_to_none=True)
                loss = space.loss(w, x, y)
                if w.grad is None:
                    raise DivergenceError(f"no gradient of the coefficients at inner step {step}; no soup was written")
                monitor.record(loss, w.grad)
                opt.step()
                sched.step()
                select = run.select_loader is not None and ((step + 1) % run.eval_every == 0 or step + 1 == steps)
                if select or (step + 1) % sync_every == 0 or step + 1 == steps:
                    monitor.flush(history, on_step)
                if select:
                    acc = accuracy(*predict(space.model, space.state(w.detach()), run.select_loader, batches.device))
                    if acc > best_acc:
                        best_acc, best_w = acc, w.detach().clone()
    finally:
        space.monitor = None
    out = best_w if run.select_loader is not None else w.detach()
    if not torch.isfinite(out).all():  # the last step is taken after the last finite loss
        raise DivergenceError("non-finite coefficients after the last inner step; no soup was written")
    return out
