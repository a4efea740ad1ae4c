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
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .checks import check_labels
from .config import SoupConfig
from .distributed import Communicator, shard_bounds, shard_loader
from .errors import DataError, DivergenceError
from .evaluation import accuracy, eval_mode, predict
from .layers import LayerMap

__all__ = ["DivergenceError", "BatchStream", "SimplexSpace", "HyperplaneSpace", "optimise", "lr_lambda"]

StateDict = dict[str, Tensor]


class BatchStream:
    """Endless ``(x, y)`` batches from a re-iterable loader, on ``device``, optionally re-batched.

    ``examples_per_epoch`` and ``batches_per_epoch`` are known before the first step; ``epochs`` counts the
    passes over the held-out set made so far (the paper's "#epoch"). ``state_dict``/``load_state_dict`` save
    and restore the position, so a resumed run sees the same batches (a shuffling loader included).

    With ``shard=(rank, world_size)`` each batch is this rank's rows ``distributed.shard_bounds`` of the
    global batch (possibly none); counts stay global. A DataLoader over a BatchSampler without re-batching
    reads only those rows (``distributed.shard_loader``); any other loader is read whole and sliced.
    """

    def __init__(self, loader: Iterable, device: str | torch.device, batch_size: int | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        if isinstance(loader, Iterator):
            raise TypeError("the held-out loader must be re-iterable (a DataLoader or a list of batches), "
                            "not a one-shot iterator")
        self.loader, self.device, self.batch_size = loader, device, batch_size
        self.shard = shard if shard is not None and shard[1] > 1 else None
        self._source: Iterable = loader
        self._sizes: list[int] | None = None  # global batch sizes of a pass, when _source reads this rank's rows
        sizes = [len(y) for _, y in self._raw()] if not hasattr(loader, "dataset") else None
        self.examples_per_epoch = len(loader.dataset) if sizes is None else sum(sizes)  # type: ignore[attr-defined]
        if self.examples_per_epoch == 0:
            raise DataError("the held-out loader is empty: coefficients cannot be learned from no data")
        if batch_size is not None:
            self.batches_per_epoch = math.ceil(self.examples_per_epoch / batch_size)
        else:
            self.batches_per_epoch = len(sizes) if sizes is not None else len(loader)  # type: ignore[arg-type]
        self.examples_seen = 0
        self._it: Iterator | None = None
        self._position = 0  # batches yielded in the current pass
        self._epoch_rng: Tensor | None = None  # global RNG at the pass's start: a shuffling sampler draws from it
        self._gen_start: list[Tensor] = []
        if self.shard is not None and batch_size is None:
            split = shard_loader(loader, *self.shard)
            if split is not None:
                self._source, self._sizes = split

    def _raw(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self._source:
            yield batch[0], batch[1]

    def _epoch(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.batch_size is None:
            yield from self._raw()
            return
        xs, ys, n = [], [], 0
        for x, y in self._raw():
            xs.append(x); ys.append(y); n += len(y)
            while n >= self.batch_size:
                x_all, y_all = torch.cat(xs), torch.cat(ys)
                yield x_all[: self.batch_size], y_all[: self.batch_size]
                xs, ys, n = [x_all[self.batch_size:]], [y_all[self.batch_size:]], n - self.batch_size
        if n:
            yield torch.cat(xs), torch.cat(ys)

    def _generators(self) -> list[torch.Generator]:
        # private generators of the loader's samplers (e.g. a seeded RandomSampler) decide the order too
        found: dict[int, torch.Generator] = {}
        for root in (self.loader, self._source):
            for obj in (root, getattr(root, "sampler", None), getattr(root, "batch_sampler", None)):
                for holder in (obj, getattr(obj, "sampler", None)):
                    g = getattr(holder, "generator", None)
                    if isinstance(g, torch.Generator):
                        found[id(g)] = g
        return list(found.values())

    def _start_pass(self) -> None:
        self._epoch_rng, self._it, self._position = torch.get_rng_state(), self._epoch(), 0
        self._gen_start = [g.get_state() for g in self._generators()]

    def next(self) -> tuple[Tensor, Tensor]:
        for _ in range(2):
            if self._it is None:
                self._start_pass()
            try:
                x, y = next(self._it)
                x, y, total = self._rows(x, y)
                self.examples_seen += total
                self._position += 1
                return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            except StopIteration:
                self._it = None
        raise DataError("the held-out loader yielded no batches")

    def _rows(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
        """This rank's rows of the batch just read, and the size of the global batch."""
        if self.shard is None:
            return x, y, len(y)
        if self._sizes is None:  # a whole global batch was read
            lo, hi = shard_bounds(len(y), *self.shard)
            return x[lo:hi], y[lo:hi], len(y)
        total = self._sizes[self._position] if self._position < len(self._sizes) else -1
        lo, hi = shard_bounds(total, *self.shard)
        if total < 0 or len(y) != max(hi - lo, 1):
            raise DataError(f"rank {self.shard[0]} read {len(y)} rows of held-out batch {self._position}; its "
                            "BatchSampler announced otherwise (did the loader's dataset or sampler change?)")
        return x[:hi - lo], y[:hi - lo], total  # [:0] drops the stand-in row of an empty part

    def state_dict(self) -> dict:
        """``{"examples_seen", "position"}`` (ints), ``"epoch_rng"`` (global RNG at the pass's start, or None) and
        ``"loader_rng"`` (states of the loader's own generators at the pass's start, or now between passes)."""
        running = self._it is not None
        return {"examples_seen": self.examples_seen, "position": self._position if running else 0,
                "epoch_rng": self._epoch_rng if running else None,
                "loader_rng": self._gen_start if running else [g.get_state() for g in self._generators()]}

    def load_state_dict(self, state: Mapping) -> None:
        """Return to a position from :meth:`state_dict` by replaying the current pass up to it.

        Cost: re-reads at most one pass of the loader. The global RNG is left as it was before the call.
        """
        self.examples_seen, self._it, self._position = int(state["examples_seen"]), None, 0
        saved = state.get("loader_rng") or []
        generators = self._generators()
        if len(saved) == len(generators):  # at the pass's start when one was running, else as they were
            for g, g_state in zip(generators, saved):
                g.set_state(g_state)
        if not state["position"]:
            return
        caller_rng = torch.get_rng_state()
        torch.set_rng_state(state["epoch_rng"])  # so a shuffling sampler draws the same order again
        try:
            self._start_pass()
            for _ in range(int(state["position"])):
                next(self._it)
                self._position += 1
        except StopIteration:
            raise DataError(f"the held-out loader has fewer batches than when the run was saved "
                            f"(position {state['position']})") from None
        finally:
            torch.set_rng_state(caller_rng)

    @property
    def epochs(self) -> float:
        return self.examples_seen / self.examples_per_epoch


def lr_lambda(steps: int, warmup: float, schedule: str) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step s: linear warm-up, then cosine to 0 (or constant)."""
    warm = int(round(warmup * steps))

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    return factor


def _cross_entropy(model: nn.Module, state: Mapping[str, Tensor], x: Tensor, y: Tensor, scale: Tensor | None) -> Tensor:
    logits = functional_call(model, dict(state), (x,))
    check_labels(y, logits.shape)  # every batch: an out-of-range label is a device-side assert on CUDA
    if scale is not None:
        logits = logits * scale
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the loss in full precision for half-precision soups
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
                 clip_grad_norm: float | None = None, comm: Communicator | None = None) -> None:
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
            loss = _cross_entropy(self.model, {**theta, **self.fixed}, x, y, self.scale)
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


class HyperplaneSpace:
    """HL/MEHL: θ(w) = soup + Σ_i (w − w0)_i s_i D_i per layer; gradients are inner products with D_i.

    The combined model is kept as ONE set of tensors moved in place as ``w`` changes (no copy per step), so
    the resident memory is the soup plus the b directions.

    Args:
        soup: the soup at ``w0``, canonical keys (mixed + fixed), each ``[*shape]``; owned and updated.
        stack: directions of the block, ``{mixed key: Tensor[b, *shape]}``; with a model-parallel ``comm``
            only this rank's rows ``comm.rows(b)``: ``Tensor[b_r, *shape]``.
        w0: coefficients at which ``soup`` was formed, ``[b, L]``.
        scale: per-direction, per-layer factor ``[b, L]`` (1/‖D_{i,l}‖ for normalised directions).
        comm: data parallel: the batch is this rank's part, and the ``[b, L]`` gradient (with a clip: ∇θ) is
            averaged over the ranks; model parallel: soup moves and the gradient's rows are summed over ranks.
    """

    def __init__(self, model: nn.Module, soup: StateDict, stack: StateDict, layers: LayerMap, w0: Tensor,
                 scale: Tensor | None = None, clip_grad_norm: float | None = None,
                 comm: Communicator | None = None) -> None:
        self.data_comm, self.model_comm = _data_and_model(comm)
        self.rows = self.model_comm.rows(len(w0)) if self.model_comm is not None else slice(0, len(w0))
        held = {v.shape[0] for v in stack.values()}
        if held and held != {self.rows.stop - self.rows.start}:
            raise ValueError(f"the stack holds {sorted(held)} rows; rows {self.rows.start}:{self.rows.stop} of "
                             f"the block of {len(w0)} were expected")
        self.model, self.theta, self.stack, self.layers = model, soup, stack, layers
        self.w0, self.applied = w0.detach().clone(), w0.detach().clone()
        self.scale = torch.ones_like(w0) if scale is None else scale
        self.fixed = {k: soup[k] for k in layers.fixed}
        self.flat = {k: stack[k].flatten(1) if stack[k].dim() > 1 else stack[k][:, None]  # [b, n_k] views
                     for k in layers.trainable}
        self.clip = clip_grad_norm
        self.extra: list[nn.Parameter] = []

    def _offsets(self, w: Tensor) -> Iterator[tuple[str, Tensor]]:
        c = ((w.detach() - self.applied) * self.scale)[self.rows].to(next(iter(self.stack.values())).dtype)
        own = ((k, torch.tensordot(_coefficient(c, self.layers.group[k]), self.stack[k], dims=1))
               for k in self.layers.mixed)
        # model parallel: each rank's rows give part of the move; their sum, bucket by bucket, is the move
        return self.model_comm.summed(own) if self.model_comm is not None else own

    @torch.no_grad()
    def state(self, w: Tensor) -> StateDict:
        """θ(w) as new tensors; the soup itself is not moved."""
        return {**{k: self.theta[k] + off for k, off in self._offsets(w)}, **self.fixed}

    @torch.no_grad()
    def move_to(self, w: Tensor) -> StateDict:
        """Move the soup to θ(w) in place and return it."""
        for k, off in self._offsets(w):
            self.theta[k].add_(off)
        self.applied = w.detach().clone()
        return self.theta

    def loss(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        self.move_to(w)
        if len(y):
            leaves = {k: self.theta[k].detach().requires_grad_(True) for k in self.layers.trainable}
            loss = _cross_entropy(self.model, {**self.theta, **leaves}, x, y, None)
            grads = list(torch.autograd.grad(loss, list(leaves.values())))
        else:  # this rank's part of a global batch with fewer rows than ranks: it adds nothing
            loss = torch.zeros((), device=w.device)
            grads = [torch.zeros_like(self.theta[k]) for k in self.layers.trainable]
        reduce_theta = self.data_comm is not None and self.clip is not None
        if reduce_theta:  # the clip needs the norm of the global ∇θ, which only ∇θ itself gives
            loss = self.data_comm.all_reduce_mean_(grads, len(y), loss)
        if self.clip is not None:
            norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
            factor = torch.clamp(self.clip / (norm + 1e-6), max=1.0)
            grads = [g * factor for g in grads]
        gw = torch.zeros_like(w)
        for k, g in zip(self.layers.trainable, grads):
            # ∂L/∂w_{i,l} += ⟨∇_θ L, D_i⟩ over the tensors of layer l: one [b, n] @ [n] product per tensor
            gw[self.rows, self.layers.group[k]] += (self.flat[k] @ g.reshape(-1).to(self.flat[k].dtype)).to(gw.dtype)
        if self.model_comm is not None:  # every rank filled its own rows: the sum is the whole gradient
            self.model_comm.all_reduce_sum_([gw])
        elif self.data_comm is not None and not reduce_theta:
            loss = self.data_comm.all_reduce_mean_([gw], len(y), loss)
        w.grad = gw * self.scale
        return loss.detach()


def optimise(space: "SimplexSpace | HyperplaneSpace", w_init: Tensor, batches: BatchStream, steps: int,
             cfg: SoupConfig, history: list[float], on_step: Callable[[float], None] | None = None) -> Tensor:
    """T = ``steps`` AdamW steps on ``w [m, L]`` (plus the space's extra parameters); returns the final ``w``.

    With ``cfg.select_loader`` the ``w`` with the best accuracy on it (checked every ``cfg.eval_every``
    steps and at the end) is returned instead of the last one.
    """
    w = nn.Parameter(w_init.detach().clone())
    opt = torch.optim.AdamW([w, *space.extra], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, cfg.warmup, cfg.schedule))
    best_acc, best_w = -1.0, w.detach().clone()
    with eval_mode(space.model):
        for step in range(steps):
            x, y = batches.next()
            opt.zero_grad(set_to_none=True)
            loss = space.loss(w, x, y)
            if not torch.isfinite(loss) or w.grad is None or not torch.isfinite(w.grad).all():
                raise DivergenceError(f"non-finite loss/gradient at inner step {step} (loss {loss.item()}); "
                                      "lower lr or add clip_grad_norm; no soup was written")
            opt.step()
            sched.step()
            history.append(loss.item())
            if on_step is not None:
                on_step(history[-1])
            if cfg.select_loader is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == steps):
                acc = accuracy(*predict(space.model, space.state(w.detach()), cfg.select_loader, batches.device))
                if acc > best_acc:
                    best_acc, best_w = acc, w.detach().clone()
    out = best_w if cfg.select_loader is not None else w.detach()
    if not torch.isfinite(out).all():  # the last step is taken after the last finite loss
        raise DivergenceError("non-finite coefficients after the last inner step; no soup was written")
    return out
