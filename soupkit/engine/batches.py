"""The batches soupkit reads: the one DataLoader builder and the held-out stream a learned soup trains on.

:func:`make_loader` builds every loader of the package (fine-tuning, held-out and test sets, in memory or on
disk); its order depends only on its seed. :class:`BatchStream` re-batches any re-iterable loader of
``(inputs, labels)``, counts steps across epochs, gives this rank its share of every batch under data
parallelism, and saves/restores its position (including a loader's private shuffling generators) so a
resumed run sees the same batches in the same order.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset

from soupkit.errors import DataError
from soupkit.runtime.distributed import shard_bounds, shard_loader

__all__ = ["make_loader", "BatchStream"]


def make_loader(data: Dataset | tuple[Tensor, Tensor], batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """DataLoader yielding ``(inputs [B, ...], labels [B])``; the shuffle order depends only on ``seed``.

    Args:
        data: a map-style Dataset of ``(input, label)`` items (read one by one and collated, e.g. images on
            disk), or tensors ``(x [N, ...], y [N])`` in memory (indexed a whole batch at once, several times
            faster than collating N single items).
        batch_size, shuffle, drop_last, num_workers, pin_memory: as ``torch.utils.data.DataLoader``; workers
            persist across epochs.
        seed: seeds the loader's private generators (the global RNG is not used): the shuffle order, and the
            base seed DataLoader draws for its workers every epoch.
    """
    loader_rng = torch.Generator().manual_seed(seed)
    workers = {"num_workers": num_workers, "pin_memory": pin_memory, "persistent_workers": num_workers > 0}
    if not isinstance(data, tuple):  # DataLoader's own RandomSampler, drawing from the loader's generator
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=loader_rng,
                          **workers)
    # In memory the order has a generator of its own (same seed) instead: the embedded zoos were built and their
    # committed results computed with that stream, the paper-scale sweeps with the one above, so both stay.
    dataset = TensorDataset(*data)
    order_rng = torch.Generator().manual_seed(seed)
    items = RandomSampler(dataset, generator=order_rng) if shuffle else SequentialSampler(dataset)
    # the sampler yields index lists and TensorDataset returns a whole batch for each (no per-item collation)
    return DataLoader(dataset, sampler=BatchSampler(items, batch_size, drop_last), batch_size=None,
                      generator=loader_rng, **workers)


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
