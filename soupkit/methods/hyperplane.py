"""HL-Soup(+) and MEHL-Soup(+): learned coefficients α on the hyperplane θ̄ + Σ α_i (θ_i − θ̄), one block of b models
at a time (block coordinate descent; HL: one block of all K), trained by the one loop of
``soupkit.engine.loop.optimise``.

The outer loop is one function (:func:`_hyperplane_blocks`); its variants are a small policy object
(:func:`centre_policy`): :class:`FixedCentre` (the paper's; ``decentralize=False`` for Appendix D) or
:class:`RecentredSoup` (the released code's ``recenter``), each with or without ``normalize_directions``. With
``cfg.systems.parallel`` it runs on every rank of a process group (``soupkit.runtime.distributed``): data parallel,
or model parallel (a block's models split over the ranks). With ``cfg.run.warm_start`` the same loop grows a
finished result: it starts from that result's soup and coefficients (``warm_var``; the maths in
``soupkit/methods/warm_start.py``) and visits the blocks of :func:`_extension_schedule` first.
"""
from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from soupkit.config import SoupConfig
from soupkit.engine.batches import BatchStream
from soupkit.engine.layers import LayerMap, layer_map
from soupkit.engine.loop import HyperplaneSpace, optimise
from soupkit.errors import DivergenceError, WarmStartError
from soupkit.methods.learned import progress_bar
from soupkit.methods.result import SoupResult
from soupkit.methods.run_dir import RunDir, RunState, describe_run
from soupkit.methods.warm_start import Previous, SoupCheck, check_models, pool_models, read_previous, start_weights
from soupkit.pool.basin import check_shared_basin
from soupkit.pool.checkpoint_pool import CheckpointPool
from soupkit.runtime.distributed import Communicator, communicator, on_main

__all__ = ["hyperplane_soup", "FixedCentre", "RecentredSoup", "centre_policy"]

StateDict = dict[str, Tensor]


# ---- the variants: where the directions start from, and what a block's step does to the weights on θ_i ---------
@dataclass(frozen=True)
class _Directions:
    """What every variant shares: directions used as read, or each divided by its per-layer norm (the released
    code's ``normalize_directions``)."""

    normalize_directions: bool = False

    def scale(self, stack: StateDict, soup: StateDict, layers: LayerMap, b: int,
              comm: Communicator | None) -> Tensor | None:
        """``[b, L]`` factors of the block's directions (None: 1)."""
        return _inverse_norms(stack, soup, layers, b, comm) if self.normalize_directions else None


@dataclass(frozen=True)
class FixedCentre(_Directions):
    """The paper's Algorithm 1: every direction starts from the centre θ̄ of all K models and each model's α is kept
    across the blocks that visit it (the soup is θ̄ + Σ_i α_i (θ_i − θ̄)). ``decentralize=False`` (Appendix D's
    ablation) takes the models themselves as directions, with weights β_i starting at 1/K (soup Σ_i β_i θ_i)."""

    decentralize: bool = True
    needs_mean_of_all = True

    @property
    def param_name(self) -> str:
        return "alpha" if self.decentralize else "beta"

    def centre(self, pool: CheckpointPool, blocks: list[list[int]], full: StateDict | None,
               cfg: SoupConfig) -> StateDict:
        return full

    def initial_weights(self, k: int, n_layers: int, blocks: list[list[int]]) -> Tensor:
        return torch.full((k, n_layers), 1 / k)

    def initial_soup(self, centre: StateDict) -> StateDict:
        # decentralised: the soup moves away from θ̄, which the directions still subtract; a copy
        return {key: v.clone() for key, v in centre.items()} if self.decentralize else centre

    def initial_var(self, weights: Tensor) -> Tensor:
        return torch.zeros_like(weights) if self.decentralize else weights.clone()

    def warm_var(self, weights: Tensor) -> Tensor:
        """The learned variable at a warm start whose weights on θ_i are ``weights [K, L]``: α = the weights
        (they sum to 1, so θ̄ + Σ α_i (θ_i − θ̄) = Σ_i w_i θ_i for any centre θ̄); β = the weights."""
        return weights.clone()

    def origin(self, centre: StateDict, soup: StateDict) -> StateDict | None:
        """What a block's directions subtract as they are read (θ̄; None: the models themselves)."""
        return centre if self.decentralize else None

    def prefetch_origin(self, centre: StateDict) -> StateDict | None:
        """The same for a block read ahead, before the soup of the block in training is known."""
        return self.origin(centre, centre)

    def finish_prefetched(self, stack: StateDict, soup: StateDict, keys: Iterable[str]) -> None:
        """Nothing: the origin did not move while the block was read."""

    def block_start(self, var: Tensor, block: list[int], n_layers: int) -> Tensor:
        return var[block]

    def reference(self, weights: Tensor) -> Tensor:
        """What a unit of α_i takes from every model's weight: θ_i − θ̄ removes 1/K of each (β: nothing)."""
        return torch.full_like(weights, 1 / len(weights)) if self.decentralize else torch.zeros_like(weights)

    def keep(self, var: Tensor, block: list[int], w: Tensor) -> None:
        var[block] = w.cpu()


@dataclass(frozen=True)
class RecentredSoup(_Directions):
    """The released code's variant (``recenter``): the first block is centred on its own mean, every later block on
    the current soup (directions θ_i − soup); each block's coefficients start at 0, so nothing is kept between
    blocks but the soup itself."""

    needs_mean_of_all = False
    param_name = "alpha"

    def centre(self, pool: CheckpointPool, blocks: list[list[int]], full: StateDict | None,
               cfg: SoupConfig) -> StateDict:
        return pool.center(cfg.systems.device, cfg.systems.dtype, indices=blocks[0])

    def initial_weights(self, k: int, n_layers: int, blocks: list[list[int]]) -> Tensor:
        weights = torch.zeros(k, n_layers)
        weights[blocks[0]] = 1 / len(blocks[0])
        return weights

    def initial_soup(self, centre: StateDict) -> StateDict:
        return centre

    def initial_var(self, weights: Tensor) -> Tensor:
        return torch.zeros_like(weights)

    def warm_var(self, weights: Tensor) -> Tensor:
        """Nothing to convert: the directions start from the soup, each block's α from 0."""
        return torch.zeros_like(weights)

    def origin(self, centre: StateDict, soup: StateDict) -> StateDict | None:
        """θ_i − soup: the soup as it is when the block's turn comes."""
        return soup

    def prefetch_origin(self, centre: StateDict) -> StateDict | None:
        """None: a block read ahead is centred once the soup has reached its place (:meth:`finish_prefetched`)."""
        return None

    def finish_prefetched(self, stack: StateDict, soup: StateDict, keys: Iterable[str]) -> None:
        for key in keys:
            stack[key].sub_(soup[key])

    def block_start(self, var: Tensor, block: list[int], n_layers: int) -> Tensor:
        return torch.zeros(len(block), n_layers)

    def reference(self, weights: Tensor) -> Tensor:
        """θ_i − soup: a unit of α_i takes the soup's own weights."""
        return weights.clone()

    def keep(self, var: Tensor, block: list[int], w: Tensor) -> None:
        pass


def centre_policy(cfg: SoupConfig) -> FixedCentre | RecentredSoup:
    """The variant ``cfg`` asks for (``recenter``, ``decentralize``, ``normalize_directions``)."""
    if cfg.variant.recenter:
        return RecentredSoup(normalize_directions=cfg.variant.normalize_directions)
    return FixedCentre(normalize_directions=cfg.variant.normalize_directions, decentralize=cfg.variant.decentralize)


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


def _extension_schedule(k_old: int, k: int, b: int, passes: int, outer: int | None, seed: int) -> list[list[int]]:
    """Blocks of a warm start: ``passes`` passes over the new models K_old..K−1, then :func:`_block_schedule`.

    Each pass is a seeded permutation of the new models cut into ceil(K_new/b) pieces of b (the last smaller), as
    a fresh run cuts its permutation of all K; a piece short of b is filled with models drawn by a seeded
    permutation of the old ones (then of the other new ones, if K_old is smaller than the gap), so every block
    holds b models. ``outer`` (None: the extension blocks alone) truncates, or continues with ordinary passes
    over all K (seeded with ``seed`` as a fresh run). K_new = 0 and ``outer`` None: no block at all.
    """
    gen = torch.Generator().manual_seed(seed)
    new = list(range(k_old, k))
    blocks: list[list[int]] = []
    for _ in range(passes if new else 0):
        order = [new[j] for j in torch.randperm(len(new), generator=gen).tolist()]
        for j in range(0, len(order), b):
            piece = order[j:j + b]
            if len(piece) < b:
                fill = torch.randperm(k_old, generator=gen).tolist() + [i for i in order if i not in piece]
                piece += fill[:b - len(piece)]
            blocks.append(sorted(piece))
    if outer is None or outer <= len(blocks):
        return blocks if outer is None else blocks[:outer]
    return blocks + _block_schedule(k, b, outer - len(blocks), True, seed)


def hyperplane_soup(model, pool, loader, cfg, layerwise: bool, blockwise: bool) -> SoupResult:
    """HL-Soup(+) (one block of all K models) and MEHL-Soup(+) (blocks of b models, block coordinate descent).

    Resident: the centre θ̄, the soup and the b directions of the current block (b + 2 models; 2b + 2
    with ``prefetch``; the directions at half size with a 16-bit ``direction_dtype``); on CUDA the centre
    stays in host memory, where the directions are formed as they are read, so the GPU holds b + 1 models.
    With ``parallel="model"`` a rank holds its b/N directions only. With ``cfg.run.run_dir``
    the state is checkpointed after every block and resumed (in a process group rank 0 reads and writes
    it and hands the state it resumes from to the other ranks). With ``cfg.run.warm_start`` (MEHL only) it
    grows that result (``soupkit/methods/warm_start.py``); the run_dir's ``run.json`` names it under ``extends``.
    """
    name = ("mehl" if blockwise else "hl") + ("+" if layerwise else "")
    algo = cfg.algorithm
    previous = None
    if cfg.run.warm_start is not None:
        if not blockwise:
            raise WarmStartError(f"warm_start grows a MEHL-Soup(+) result by blocks of b models; {name} trains all "
                                 "K models in one block (use mehl/mehl+ with model_batch_size=K for that)")
        previous = read_previous(cfg.run.warm_start)
    k = len(pool)
    b = k
    if blockwise:
        b = algo.model_batch_size or math.ceil(k / 4)
        if b > k:
            warnings.warn(f"model_batch_size={b} > K={k}: using b = K", stacklevel=4)
            b = k
    if previous is None:
        outer = algo.outer_iterations or (math.ceil(k / b) if blockwise else 1)
        blocks = _block_schedule(k, b, outer, blockwise, cfg.run.seed)
    else:
        blocks = _extension_schedule(min(previous.k, k), k, b, algo.extend_passes or 1, algo.outer_iterations,
                                     cfg.run.seed)
    layers = layer_map(model, layerwise, algo.layer_grouping)
    comm = communicator(cfg.systems.parallel)
    batches = BatchStream(loader, cfg.systems.device, algo.batch_size,
                          comm.data_shard if comm is not None else None)
    run = None
    if cfg.run.run_dir is not None:  # locks the directory and refuses another run's state, before any reading
        extends = previous.provenance() if previous is not None else None
        run = on_main(comm, lambda: RunDir(cfg.run.run_dir, describe_run(name, cfg, pool, layers, batches, blocks,
                                                                          extends)))
    with run if run is not None else nullcontext():
        result = _hyperplane_blocks(name, model, pool, cfg, layers, batches, blocks, b, run, comm, previous)
    # what a later warm start checks its pool against (known from the first pass: no model is read again)
    result.stats["pool_models"] = pool_models(pool)
    if previous is not None:
        k_new = k - previous.k
        first = (algo.extend_passes or 1) * math.ceil(k_new / b)
        result.stats["extends"].update(new_models=k_new, new_model_blocks=min(first, len(blocks)))
    return result


def _restore(run: RunDir | None, pool: CheckpointPool, batches: BatchStream, device: str | torch.device,
             comm: Communicator | None) -> RunState | None:
    """The state saved in ``run`` (None if none), with the RNG and the stream put back, on every rank."""
    if comm is None or comm.world_size == 1:
        return run.restore(pool, batches, device) if run is not None else None

    def read() -> tuple | None:  # rank 0; the soup goes over the wire from the CPU
        saved = run.restore(pool, batches, device) if run is not None else None
        if saved is None:
            return None
        saved.soup = {key: v.cpu() for key, v in saved.soup.items()}
        return saved, batches.state_dict(), torch.get_rng_state()

    shared = on_main(comm, read, share=True)
    if shared is None:
        return None
    saved, stream, rng = shared
    if not comm.is_main:
        batches.load_state_dict(stream)
        torch.set_rng_state(rng)
    saved.soup = {key: v.to(device) for key, v in saved.soup.items()}
    return saved


def _warm_state(previous: Previous, policy: FixedCentre | RecentredSoup, pool: CheckpointPool, layers: LayerMap,
                layerwise: bool, cfg: SoupConfig) -> tuple[StateDict, Tensor, Tensor, StateDict, dict]:
    """The centre pass of a warm start: ``(θ̄ of all K, weights [K, L], var [K, L], soup θ_old, stats)``, with the
    old models checked (fingerprints, then θ_old = Σ_i w_i θ_i) in the same streamed pass, one model resident."""
    systems, where = cfg.systems, previous.source or "the warm_start result"
    weights = start_weights(previous, len(pool), list(layers.names) if layerwise else None,
                            sum_to_one=not isinstance(policy, FixedCentre) or policy.decentralize)
    missing = [key for key in layers.forward_keys if key not in previous.soup]
    if missing:
        raise WarmStartError(f"{where}: its soup lacks the model's key {missing[0]!r}")
    soup = {key: (v.to(systems.device, systems.dtype) if v.is_floating_point() else v.to(systems.device)).clone()
            for key, v in ((key, previous.soup[key]) for key in layers.forward_keys)}
    check = SoupCheck(weights, layers.group, soup)
    full = pool.center(systems.device, systems.dtype, each=check)
    check_models(previous, pool)  # the fingerprints name the model at fault, so they come before the residual
    residual = check.check(where)
    del check
    return full, weights, policy.warm_var(weights), soup, {**previous.provenance(), "soup_residual": residual}


def _hyperplane_blocks(name: str, model: nn.Module, pool: CheckpointPool, cfg: SoupConfig, layers: LayerMap,
                       batches: BatchStream, blocks: list[list[int]], b: int, run: RunDir | None,
                       comm: Communicator | None, previous: Previous | None = None) -> SoupResult:
    """The outer loop of :func:`hyperplane_soup`, from the saved state in ``run`` if there is one, else from
    ``previous`` (a warm start) if given, else from the policy's start."""
    systems = cfg.systems
    k, n_layers, layerwise = len(pool), len(layers), name.endswith("+")
    split = comm is not None and comm.mode == "model"  # this rank holds rows comm.rows(b) of each block
    steps = cfg.algorithm.inner_iterations or math.ceil(cfg.algorithm.epochs * batches.batches_per_epoch)
    keys = list(layers.mixed)
    policy = centre_policy(cfg)

    # one streamed pass before any training: the centre, and (in the pool) the NaN/Inf check and the norms of
    # every model, which the basin check and the resume check reuse; a warm start checks the old models in it
    extends = None
    if previous is not None:
        full, weights, var, soup, extends = _warm_state(previous, policy, pool, layers, layerwise, cfg)
    else:
        full = pool.center(systems.device, systems.dtype) if cfg.run.check_basin or policy.needs_mean_of_all else None
    pool.check_values(systems.device, systems.dtype)  # a no-op after that pass; recenter without it reads block 0 only
    basin = check_shared_basin(pool, full).mean_cosine if cfg.run.check_basin else None
    if previous is None:
        centre = policy.centre(pool, blocks, full, cfg)
        # weights[i, l] on θ_i of the soup; var = the learned α (β without decentralisation) the blocks start from
        weights = policy.initial_weights(k, n_layers, blocks)
        centre = {key: centre[key] for key in layers.forward_keys}  # aliases of tied tensors are re-added at the end
        soup = policy.initial_soup(centre)
        var = policy.initial_var(weights)
    else:  # re-centred directions never read θ̄: the soup stands in for it
        centre = {key: full[key] for key in layers.forward_keys} if policy.needs_mean_of_all else soup
    del full
    if soup is not centre and torch.device(systems.device).type != "cpu":
        centre = {key: v.cpu() for key, v in centre.items()}  # only load_stack reads it: host memory is cheaper
    history: list[float] = []
    saved = _restore(run, pool, batches, systems.device, comm) if cfg.run.run_dir is not None else None
    first = 0 if saved is None else saved.blocks_done
    if saved is not None:
        weights, var, soup, history = saved.weights, saved.var, saved.soup, saved.history
    pending = None
    ddtype = systems.direction_dtype or systems.dtype
    pinned = torch.device(systems.device).type == "cuda"
    with progress_bar(cfg, steps * len(blocks), name) as bar:
        bar.update(steps * first)
        for t in range(first, len(blocks)):
            block = blocks[t]
            fresh = pending is None
            if fresh:
                stack = pool.load_stack(_own(block, comm, split), systems.device, ddtype,
                                        subtract=policy.origin(centre, soup), keys=keys)
            else:
                stack = pending.result()
            if systems.prefetch and t + 1 < len(blocks):
                pending = pool.prefetch_stack(_own(blocks[t + 1], comm, split), device=systems.device, dtype=ddtype,
                                              subtract=policy.prefetch_origin(centre), keys=keys, pin_memory=pinned)
            else:
                pending = None
            if not fresh:  # after the next read started, so that both overlap
                policy.finish_prefetched(stack, soup, keys)
            scale = policy.scale(stack, soup, layers, len(block), comm if split else None)
            w0 = policy.block_start(var, block, n_layers).to(systems.device)
            space = HyperplaneSpace(model, soup, stack, layers, w0, scale, cfg.algorithm.clip_grad_norm, comm,
                                    autocast=systems.autocast_dtype)
            bar.set_postfix(block=f"{t + 1}/{len(blocks)}", b=len(block))
            try:
                w = optimise(space, w0, batches, steps, cfg, history, lambda loss: bar.update(1))
                soup = space.move_to(w)
                _check_finite(soup, layers.trainable)
            except DivergenceError as err:
                kept = f"; {run.path} keeps the state after block {t}" if run is not None else ""
                raise DivergenceError(f"outer iteration {t + 1}/{len(blocks)}: {err}{kept}") from None
            step = ((w - w0) * space.scale).cpu()  # change of the weight on each θ_i of the block, [b, L]
            weights -= policy.reference(weights) * step.sum(dim=0, keepdim=True)
            weights[block] += step
            policy.keep(var, block, w)
            del stack, space
            if cfg.run.run_dir is not None:
                on_main(comm, lambda: run.save(RunState(t + 1, weights, var, soup, history), pool, batches))
    coefficients = weights if layerwise else weights[:, 0]
    resumed = {"resumed_from_block": first} if cfg.run.run_dir is not None else {}
    if extends is not None:  # what this run grew (hyperplane_soup adds how many blocks held new models)
        resumed["extends"] = extends
    return SoupResult(name, layers.complete(soup), coefficients, list(layers.names) if layerwise else None,
                      history=history, params={policy.param_name: var},
                      stats={"epochs": batches.epochs, "inner_iterations": steps, "outer_iterations": len(blocks),
                             "model_batch_size": b, "basin_mean_cosine": basin, **resumed})


def _check_finite(soup: StateDict, keys: Iterable[str]) -> None:
    """Parameters only: a buffer may hold legitimate infinities (a mask of -inf)."""
    bad = [k for k in keys if not torch.isfinite(soup[k]).all()]
    if bad:
        raise DivergenceError(f"the soup holds NaN/Inf in {bad[0]!r}; lower lr or add clip_grad_norm")


def _own(block: list[int], comm: Communicator | None, split: bool) -> list[int]:
    """The models of ``block`` whose directions this rank holds."""
    return block[comm.rows(len(block))] if split else block


def _inverse_norms(stack: StateDict, soup: StateDict, layers, b: int, comm: Communicator | None = None) -> Tensor:
    """``[b, L]``: 1 / ‖D_{i,l}‖ over the parameter tensors of each layer.

    A direction shorter than 1e-6 of its layer's norm in the soup is rounding noise (e.g. a bias that no
    fine-tune changed); dividing by it would blow the noise up, so its factor is 0: it stays fixed.
    With a model-parallel ``comm`` the stack holds rows ``comm.rows(b)``; the others come from their ranks.
    """
    device = next(iter(stack.values())).device
    rows = comm.rows(b) if comm is not None else slice(0, b)
    sq = torch.zeros(b, len(layers), device=device)
    ref = torch.zeros(len(layers), device=device)
    for key in layers.trainable:
        held = stack[key]
        sq[rows, layers.group[key]] += held.reshape(len(held), math.prod(held.shape[1:])).float().pow(2).sum(dim=1)
        ref[layers.group[key]] += soup[key].float().pow(2).sum()
    if comm is not None:
        comm.all_reduce_sum_([sq])  # rows of other ranks are 0 here
    norms = sq.sqrt()
    return torch.where(norms > 1e-6 * ref.sqrt() + 1e-12, 1 / norms, torch.zeros_like(norms))
