"""Learned soups over the N ranks of a ``torch.distributed`` process group (``Systems.parallel``).

Every rank runs the same loop (``soupkit.engine.loop.optimise``) on the same coefficients; the spaces reduce what differs
between ranks once per step, so all ranks take identical AdamW steps and end with identical coefficients.

* ``parallel="data"`` (every learned soup): each global batch of the held-out stream is cut into N contiguous
  parts, rank r keeping rows ``shard_bounds(B, r, N)``; a ``DataLoader`` over a ``BatchSampler`` is rebuilt
  so that each rank reads (decodes, transfers) only its own rows. A rank's loss and gradient are means over
  its n_r rows; ONE all-reduce per step sums ``n_r · (gradient, loss)`` and ``n_r``, and dividing by
  Σ n_r gives the mean over the global batch: the single-process value, up to float rounding. What is
  reduced is the coefficient gradient ``[b, L]`` (logits and logit scale for Learned-Soup), or, for HL/MEHL
  with ``clip_grad_norm``, the soup's gradient ∇θ (model-sized), whose global norm the clip needs.
* ``parallel="model"`` (HL/MEHL): the b models of a block are split into N contiguous row ranges; a rank
  holds only its rows' directions D_i, every rank sees the same batches. Per step: ONE all-reduce of the
  model-sized soup delta Σ_{i∈rows} Δc_i D_i (bucketed) and one of the ``[b, L]`` gradient in which each
  rank filled its own rows. The soup, the centre and ``w`` are replicated.

Without an initialised process group a communicator is a world of one and every collective is a no-op.
"""
from __future__ import annotations

import inspect
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Sampler

__all__ = ["MODES", "Communicator", "communicator", "shard_bounds", "shard_loader", "on_main"]

MODES = ("data", "model")
BUCKET_NUMEL = 1 << 22  # elements per all-reduce of model-sized sums (16 MiB in float32), see Communicator
T = TypeVar("T")
_LOADER_ATTRS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                 "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers", "in_order")


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a batch of ``n`` that ``rank`` keeps: contiguous, sizes differ by at most one.

    >>> [shard_bounds(5, r, 2) for r in range(2)]
    [(0, 2), (2, 5)]
    """
    return rank * n // world_size, (rank + 1) * n // world_size


@dataclass(frozen=True)
class Communicator:
    """This process's place in a process group, and the few collectives the soup loop needs.

    Attributes:
        mode: ``"data"`` or ``"model"`` (see the module docstring).
        rank, world_size: of ``group``.
        group: the process group (None: the default one).
        bucket_numel: model-sized reductions go in all-reduces of at most this many elements (16 MiB in
            float32): tensors are packed into one buffer up to it, a bigger tensor goes alone, in place.
    """

    mode: str
    rank: int = 0
    world_size: int = 1
    group: Any = None
    bucket_numel: int = BUCKET_NUMEL

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` when this rank reads a part of every batch, else None."""
        return (self.rank, self.world_size) if self.mode == "data" and self.world_size > 1 else None

    def rows(self, n: int) -> slice:
        """The rows of ``n`` this rank owns."""
        return slice(*shard_bounds(n, self.rank, self.world_size))

    # ---- collectives (all ranks must call them in the same order) -------------------------------------------
    def _sum(self, tensors: Sequence[Tensor], factor: float = 1.0) -> None:
        """In place: ``t ← Σ_ranks factor·t``, in ONE all-reduce: alone in place, or packed into a copy."""
        if len(tensors) == 1 and tensors[0].dtype in (torch.float32, torch.float64) and tensors[0].is_contiguous():
            t = tensors[0].mul_(factor) if factor != 1 else tensors[0]
            dist.all_reduce(t, group=self.group)
            return
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        if factor != 1:
            flat.mul_(factor)
        dist.all_reduce(flat, group=self.group)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def _buckets(self, items: Iterable[T], numel: Callable[[T], int]) -> Iterator[list[T]]:
        """Consecutive items in groups of at most ``bucket_numel`` elements (a bigger item alone)."""
        bucket: list[T] = []
        size = 0
        for item in items:
            if bucket and size + numel(item) > self.bucket_numel:
                yield bucket
                bucket, size = [], 0
            bucket.append(item)
            size += numel(item)
        if bucket:
            yield bucket

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """In place: each tensor becomes its sum over the ranks."""
        if self.world_size > 1:
            for bucket in self._buckets(tensors, Tensor.numel):
                self._sum(bucket)

    def all_reduce_mean_(self, tensors: Sequence[Tensor], n: int, loss: Tensor) -> Tensor:
        """In place: means over this rank's ``n`` examples become means over all ranks' examples.

        Args:
            tensors: gradients of the rank's mean loss (any shapes); overwritten by Σ_r n_r t_r / Σ_r n_r.
            n: examples of this rank's part of the global batch (0 for an empty part).
            loss: the rank's mean loss, a scalar.

        Returns:
            The mean loss over the global batch (a scalar on ``loss``'s device). One all-reduce when the
            tensors hold fewer than ``bucket_numel`` elements (the loss and the count travel with them).
        """
        if self.world_size == 1:
            return loss
        head = torch.stack([loss.detach().float(), torch.ones((), device=loss.device)])  # × n: Σ n_r·loss_r, Σ n_r
        for bucket in self._buckets([head, *tensors], Tensor.numel):
            self._sum(bucket, float(n))
        total = head[1].item()
        for t in tensors:
            t.div_(total)
        return (head[0] / total).to(loss.dtype)

    def summed(self, items: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        """The ``(key, tensor)`` pairs with each tensor summed over the ranks, reduced bucket by bucket.

        Holds one bucket at a time (and its packed copy), so a model-sized sum costs about two buckets of
        memory, not a model; a tensor bigger than a bucket is reduced in place.
        """
        if self.world_size == 1:
            yield from items
            return
        for bucket in self._buckets(items, lambda item: item[1].numel()):
            self._sum([t for _, t in bucket])
            yield from bucket

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled; keep tensors on the CPU)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                   group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small picklable objects)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def communicator(mode: str | None, group: Any = None) -> Communicator | None:
    """The communicator of ``parallel=mode`` in the current process group (a world of one if there is none).

    Returns None for ``mode=None`` (a single process, whatever the process group). Its buckets hold
    ``BUCKET_NUMEL`` elements, read now (set the module's constant to tune them).
    """
    if mode is None:
        return None
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {MODES} or None, got {mode!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return Communicator(mode, bucket_numel=BUCKET_NUMEL)
    return Communicator(mode, dist.get_rank(group), dist.get_world_size(group), group, BUCKET_NUMEL)


def on_main(comm: Communicator | None, fn: Callable[[], T], share: bool = False) -> T | None:
    """``fn()`` on rank 0 only; an exception it raises is raised on EVERY rank (so none waits for a peer).

    Returns ``fn()`` on rank 0 and None on the others, or (``share=True``) rank 0's value on every rank.
    """
    if comm is None or comm.world_size == 1:
        return fn()
    value, error, sent = None, None, None
    if comm.is_main:
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001  re-raised below, here and on every other rank
            error = sent = err
            try:
                pickle.loads(pickle.dumps(err))
            except Exception:  # noqa: BLE001  an exception that does not survive pickling: send its text
                sent = RuntimeError(f"rank 0: {type(err).__name__}: {err}")
    sent = comm.broadcast(sent)
    if sent is not None:
        raise error if error is not None else sent
    if share:
        return comm.broadcast(value)
    return value


# ---- data: each rank reads its own rows of every global batch -----------------------------------------------
class _RowsOfBatches(Sampler):
    """Index lists: this rank's rows of each global batch of ``batches``; one row if its part is empty.

    The stream drops that stand-in row (a part can be empty when a batch has fewer rows than ranks); reading
    one row keeps the batch's shape and dtype known.
    """

    def __init__(self, batches: BatchSampler, rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.batches:
            lo, hi = shard_bounds(len(indices), self.rank, self.world_size)
            yield list(indices[lo:hi]) if hi > lo else list(indices[:1])


def shard_loader(loader: Iterable, rank: int, world_size: int) -> tuple[DataLoader, list[int]] | None:
    """A DataLoader that reads only ``rank``'s rows of each global batch of ``loader``.

    It draws the global batches exactly as ``loader`` would (the same sampler and generator objects, consumed
    in the same order), so with the same seed every rank cuts the same global batches.

    Returns:
        ``(loader of this rank's rows, [B_j] sizes of the global batches of one pass)``; None when the
        batches cannot be cut before reading: not a map-style DataLoader whose indices come from a
        ``torch.utils.data.BatchSampler`` (the caller then reads whole batches and slices them).
    """
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    automatic = loader.batch_size is not None  # the DataLoader batches the index lists of batch_sampler itself
    batches = loader.batch_sampler if automatic else loader.sampler
    if type(batches) is not BatchSampler:  # a subclass may cut batches differently: sizes unknown
        return None
    n, size = len(batches.sampler), batches.batch_size  # type: ignore[arg-type]
    sizes = [size] * (n // size) + ([n % size] if n % size and not batches.drop_last else [])
    accepted = inspect.signature(DataLoader).parameters
    kwargs = {a: getattr(loader, a) for a in _LOADER_ATTRS if a in accepted and hasattr(loader, a)}
    rows = _RowsOfBatches(batches, rank, world_size)
    if automatic:
        return DataLoader(loader.dataset, batch_sampler=rows, **kwargs), sizes
    return DataLoader(loader.dataset, sampler=rows, batch_size=None, **kwargs), sizes
