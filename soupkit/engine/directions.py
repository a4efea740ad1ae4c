"""The b directions of a model block as ONE contiguous ``[b, P]`` buffer, and the two products MEHL needs of it.

A block's directions D_i = θ_i − θ̄ (P = the elements of the mixed tensors) live in one buffer; each key is a
column segment, seen as a ``[b, *shape]`` view (:func:`pack`, and :meth:`soupkit.CheckpointPool.load_stack`,
which reads checkpoints straight into it). One allocation, one host-to-device copy per block, and every
per-key product reads a strided view without a copy:

* ``⟨∇θ_k L, D_{i,k}⟩`` for all i at once: ``D_k [b, n] @ g [n]`` (:func:`inner`);
* the soup's move ``θ_k += D_kᵀ c_k``: one in-place ``addmv`` per key, no temporary (:func:`add_moved`).

The buffer may be stored in a lower precision than the soup (``direction_dtype``: bf16/fp16 halve it); both
products then accumulate in float32, upcasting a bounded chunk of columns at a time (``CHUNK`` elements).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["Stack", "pack", "inner", "add_moved", "moved", "CHUNK"]

CHUNK = 1 << 22  # elements of a low-precision block upcast at once (16 MiB in float32)


class Stack(dict):
    """``{key: Tensor[b, *shape]}`` whose values are views of ``flat`` ``[b, P]`` (None when keys differ in dtype).

    A dict subclass (so :class:`CheckpointPool` can see when it is freed); ``spans[key] = (start, numel)``.
    """

    flat: Tensor | None = None
    spans: dict[str, tuple[int, int]]


def empty(shapes: Mapping[str, tuple[int, ...]], b: int, device: str | torch.device, dtype: torch.dtype,
          pin_memory: bool = False) -> Stack:
    """An uninitialised :class:`Stack` of ``b`` rows for ``shapes`` (one ``[b, P]`` buffer)."""
    spans, start = {}, 0
    for key, shape in shapes.items():
        n = math.prod(shape)
        spans[key] = (start, n)
        start += n
    flat = torch.empty((b, start), device=device, dtype=dtype, pin_memory=pin_memory)
    out = Stack({key: flat[:, s:s + n].view(b, *shapes[key]) for key, (s, n) in spans.items()})
    out.flat, out.spans = flat, spans
    return out


def pack(stack: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> Stack:
    """``stack`` as a :class:`Stack` (returned as is when it already is one holding ``keys``; else one copy)."""
    keys = list(stack if keys is None else keys)
    if isinstance(stack, Stack) and stack.flat is not None and all(k in stack.spans for k in keys):
        return stack
    first = stack[keys[0]]
    out = empty({k: tuple(stack[k].shape[1:]) for k in keys}, first.shape[0], first.device, first.dtype)
    for k in keys:
        out[k].copy_(stack[k])
    return out


def _low(t: Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def inner(d: Tensor, g: Tensor) -> Tensor:
    """``[b]``: ⟨g, D_i⟩ for the rows of ``d [b, n]`` (a strided view is fine), ``g`` any shape of n elements.

    In float32, or float64 for a float64 ``d``.
    """
    g = g.reshape(-1)
    if not _low(d):
        return (d @ g.to(d.dtype)).to(torch.promote_types(d.dtype, torch.float32))
    g = g.float()
    step = max(1, CHUNK // max(1, d.shape[0]))
    out = torch.zeros(d.shape[0], device=d.device, dtype=torch.float32)
    for a in range(0, d.shape[1], step):
        out += d[:, a:a + step].float() @ g[a:a + step]
    return out


def add_moved(theta: Tensor, d: Tensor, c: Tensor) -> None:
    """In place: ``theta += Σ_i c_i D_i`` for ``d [b, n]`` (rows D_i) and ``c [b]``; one fused ``addmv``."""
    if not theta.is_contiguous():
        theta.add_(moved(d, c, theta.contiguous()))
        return
    flat = theta.view(-1)
    if not _low(d) and d.dtype == theta.dtype:
        flat.addmv_(d.T, c.to(d.dtype))
        return
    c = c.to(theta.dtype)
    step = max(1, CHUNK // max(1, d.shape[0]))
    for a in range(0, d.shape[1], step):
        flat[a:a + step].addmv_(d[:, a:a + step].T.to(theta.dtype), c)


def moved(d: Tensor, c: Tensor, like: Tensor) -> Tensor:
    """``Σ_i c_i D_i`` as a new tensor shaped and typed as ``like``."""
    out = torch.zeros_like(like)
    add_moved(out, d, c)
    return out
