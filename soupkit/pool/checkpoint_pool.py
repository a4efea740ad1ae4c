"""An ordered set of K fine-tuned checkpoints of one architecture, read lazily and validated up front
(file formats: ``soupkit/pool/formats.py``).

Checkpoints are files (``.safetensors``; ``.pt``/``.pth`` state dicts read with ``weights_only=True`` and
memory-mapped where the file format allows) or in-memory state dicts. At most the models a caller asks for
are resident: the centre θ̄ streams one model at a time, a block of models is read as one stacked tensor per
key, and the next block can be read on a background thread while the current one is used.

Nothing is trusted: ``.pt`` files are unpickled with ``weights_only=True`` (no code runs), every parse failure
is a :class:`CheckpointError` naming the file, keys/shapes/dtypes are compared before any weights are read,
and each model's values are checked for NaN/Inf the first time it is read (``check_finite``).
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch
from safetensors import safe_open
from torch import Tensor, nn

from soupkit.engine import directions
from soupkit.errors import CheckpointError, MissingPretrainedError
from soupkit.pool.basin import finite_sq_norms
from soupkit.pool.formats import _SAFETENSORS_DTYPES, TensorSpec, _Loaded, _SafetensorsReader, load_state_dict

__all__ = ["CheckpointPool", "sample_digest"]

Source = Union[str, os.PathLike, Mapping[str, Tensor]]
StateDict = dict[str, Tensor]


class CheckpointPool:
    """K checkpoints of one architecture.

    Args:
        sources: file paths (``.safetensors``, ``.pt``, ``.pth``) or state dicts, in a fixed order.
        model: optional module of the architecture; the checkpoints must match its ``state_dict()``.
        cast_dtype: if given, floating tensors of differing dtypes are allowed and cast to it when read.
        check_finite: raise if a model holds NaN/Inf values, checked the first time it is read (per dtype it
            is read in) by the one norm reduction per tensor that also records ``sq_norms``. Turn it off for
            models with legitimate infinities (e.g. a mask buffer of -inf).
        pretrained: optional θ_0, the model every fine-tune started from (a file or a state dict, like the
            sources), for the methods that need it (Model Stock, task arithmetic): checked against the first
            checkpoint's keys, shapes and dtypes here, read with :meth:`load_pretrained`. It is not one of the K.

    Attributes:
        spec: ``{key: TensorSpec}`` of the first checkpoint, which all others match.
        sq_norms: ``{i: {key: ‖θ_i[key]‖²}}`` of the models read so far (for the basin and resume checks).
        digests: ``{i: str}`` content fingerprint of each model read so far (:func:`sample_digest` of the values
            as stored, before any cast), which a warm start compares with the models of the result it grows.
        max_resident: the largest number of fine-tuned models held at once (instrumentation; see ``resident``).
        pretrained, pretrained_name: the ``pretrained`` source (None without one) and its name in messages.
    """

    def __init__(self, sources: Iterable[Source], *, model: nn.Module | None = None,
                 cast_dtype: torch.dtype | None = None, check_finite: bool = True,
                 pretrained: Source | None = None) -> None:
        self.sources: list[Source] = list(sources)
        if not self.sources:
            raise CheckpointError("the pool is empty (K = 0): give at least one checkpoint")
        self.names = [f"<state dict {i}>" if isinstance(s, Mapping) else str(s) for i, s in enumerate(self.sources)]
        self.cast_dtype = cast_dtype
        self.check_finite = check_finite
        self.sq_norms: dict[int, dict[str, float]] = {}
        self.digests: dict[int, str] = {}
        self._checked: set[tuple[int, frozenset]] = set()  # (model, floating dtypes it was checked in)
        self.spec: dict[str, TensorSpec] = self._read_spec(0)
        for i in range(1, len(self)):
            self._check_spec(self._read_spec(i), self.names[i], f"the first checkpoint ({self.names[0]})")
        self.pretrained: Source | None = pretrained
        self.pretrained_name: str | None = None
        self._pretrained_checked: set[frozenset] = set()  # floating dtypes θ_0 was checked for NaN/Inf in
        if pretrained is not None:
            self.pretrained_name = ("<pretrained state dict>" if isinstance(pretrained, Mapping)
                                    else f"{pretrained} (the pretrained model)")
            self._check_spec(self._spec_of(pretrained, self.pretrained_name), self.pretrained_name,
                             f"the first checkpoint ({self.names[0]})")
        if model is not None:
            self.check_model(model)
        self._lock = threading.Lock()
        self.resident = 0
        self.max_resident = 0
        self.loads = 0
        self._executor: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.sources)

    def __repr__(self) -> str:
        return f"CheckpointPool(K={len(self)}, keys={len(self.spec)})"

    # ---- validation -------------------------------------------------------------------------------------
    def _read_spec(self, i: int) -> dict[str, TensorSpec]:
        return self._spec_of(self.sources[i], self.names[i])

    def _spec_of(self, source: Source, name: str) -> dict[str, TensorSpec]:
        if isinstance(source, Mapping):
            state = source
        else:
            path = Path(source)
            if path.suffix == ".safetensors" and path.is_file():
                try:  # the header only: no tensor is read
                    with safe_open(str(path), framework="pt") as fh:
                        slices = {k: fh.get_slice(k) for k in fh.keys()}
                        header = {k: (tuple(v.get_shape()), v.get_dtype()) for k, v in slices.items()}
                except Exception as err:  # noqa: BLE001  an untrusted header failing to parse is the file's fault
                    raise CheckpointError(f"{path}: cannot be read as safetensors ({err})") from err
                unknown = [k for k, (_, code) in header.items() if code not in _SAFETENSORS_DTYPES]
                if unknown:
                    raise CheckpointError(f"{path}: key {unknown[0]!r} has dtype {header[unknown[0]][1]}, "
                                          "which soupkit does not read")
                return {k: TensorSpec(shape, _SAFETENSORS_DTYPES[code]) for k, (shape, code) in header.items()}
            state = load_state_dict(path)  # memory-mapped for zip-format .pt: cheap
        for key, value in state.items():
            if not isinstance(value, Tensor):
                raise CheckpointError(f"{name}: key {key!r} is a {type(value).__name__}, not a tensor")
        return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}

    def _check_spec(self, spec: Mapping[str, TensorSpec], name: str, against: str) -> None:
        missing = [k for k in self.spec if k not in spec]
        extra = [k for k in spec if k not in self.spec]
        if missing or extra:
            what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
            raise CheckpointError(f"{name}: {what} compared with {against} "
                                  f"({len(missing)} missing, {len(extra)} unexpected)")
        for key, ref in self.spec.items():
            got = spec[key]
            if got.shape != ref.shape:
                raise CheckpointError(f"{name}: key {key!r} has shape {list(got.shape)}, "
                                      f"{against} has {list(ref.shape)}")
            if got.dtype != ref.dtype:
                both_float = got.dtype.is_floating_point and ref.dtype.is_floating_point
                if not (self.cast_dtype is not None and both_float):
                    raise CheckpointError(f"{name}: key {key!r} has dtype {got.dtype}, {against} has {ref.dtype} "
                                          "(CheckpointPool(..., cast_dtype=torch.float32) allows a cast)")

    def check_model(self, model: nn.Module) -> None:
        """Raise CheckpointError unless the checkpoints match ``model.state_dict()`` in keys, shapes, dtypes."""
        spec = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        missing = [k for k in spec if k not in self.spec]
        extra = [k for k in self.spec if k not in spec]
        if missing or extra:
            what = f"lacks the model's key {missing[0]!r}" if missing else f"has key {extra[0]!r} the model lacks"
            raise CheckpointError(f"{self.names[0]}: {what} ({len(missing)} missing, {len(extra)} unexpected)")
        for key, ref in spec.items():
            if self.spec[key].shape != ref.shape:
                raise CheckpointError(f"{self.names[0]}: key {key!r} has shape {list(self.spec[key].shape)}, "
                                      f"the model has {list(ref.shape)}")

    # ---- reading ----------------------------------------------------------------------------------------
    def _track(self, obj: object, count: int) -> None:
        with self._lock:
            self.resident += count
            self.max_resident = max(self.max_resident, self.resident)
            self.loads += 1
        weakref.finalize(obj, self._release, count)

    def _release(self, count: int) -> None:
        with self._lock:
            self.resident -= count

    def _cast(self, t: Tensor, device: torch.device | str, dtype: torch.dtype | None) -> Tensor:
        if t.is_floating_point():
            dtype = dtype or self.cast_dtype or t.dtype
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    def load(self, i: int, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> StateDict:
        """Model ``i`` as a state dict on ``device``; floating tensors cast to ``dtype`` if given.

        Read-only: for in-memory sources already on ``device``/``dtype`` the tensors are the caller's own.
        """
        source = self.sources[i]
        raw = source if isinstance(source, Mapping) else load_state_dict(source)
        self._check_spec({k: TensorSpec(tuple(v.shape), v.dtype) for k, v in raw.items()}, self.names[i],
                         f"the first checkpoint ({self.names[0]})")  # files may change after construction
        out = _Loaded({k: self._cast(raw[k], device, dtype) for k in self.spec})
        checked = self._value_key(i, dtype)
        if checked not in self._checked:
            # after the cast: a float32 value beyond float16's range becomes Inf only in the float16 copy
            self.sq_norms.setdefault(i, finite_sq_norms(out, self.names[i], check=self.check_finite))
            if i not in self.digests:  # of the stored values: the same whatever dtype a run reads them in
                self.digests[i] = sample_digest(raw)
            self._checked.add(checked)
        self._track(out, 1)
        return out

    @property
    def has_pretrained(self) -> bool:
        """Whether the pool knows θ_0 (``CheckpointPool(..., pretrained=...)``)."""
        return self.pretrained is not None

    def load_pretrained(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> StateDict:
        """θ_0, the pretrained model, as :meth:`load` reads a fine-tune: checked against the pool's keys, shapes
        and dtypes, floating tensors cast to ``dtype``, NaN/Inf-checked the first time (per dtype). Read-only, as
        :meth:`load`. Not counted in ``resident`` (which counts fine-tuned models).

        Raises:
            MissingPretrainedError: the pool was built without ``pretrained=``.
        """
        if self.pretrained is None:
            raise MissingPretrainedError(
                "this method needs the pretrained model θ_0 (the weights every fine-tune started from), and the "
                "pool has none: build it with CheckpointPool(sources, pretrained=<file or state dict>); for a zoo, "
                "CheckpointPool(zoo.paths, pretrained=zoo.pretrained_path) (the embedded zoo's backbone.safetensors)")
        source, name = self.pretrained, self.pretrained_name
        raw = source if isinstance(source, Mapping) else load_state_dict(source)
        self._check_spec({k: TensorSpec(tuple(v.shape), v.dtype) for k, v in raw.items()}, name,
                         f"the first checkpoint ({self.names[0]})")  # the file may change after construction
        out = _Loaded({k: self._cast(raw[k], device, dtype) for k in self.spec})
        checked = self._value_key(-1, dtype)[1]
        if self.check_finite and checked not in self._pretrained_checked:
            finite_sq_norms(out, name, check=True)
            self._pretrained_checked.add(checked)
        return out

    def _value_key(self, i: int, dtype: torch.dtype | None) -> tuple[int, frozenset]:
        floats = (s.dtype for s in self.spec.values() if s.dtype.is_floating_point)
        return i, frozenset(dtype or self.cast_dtype or d for d in floats)

    def check_values(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        """Read (one at a time) every model not yet checked for NaN/Inf in ``dtype``; no-op without ``check_finite``.

        Raises:
            CheckpointError: naming the first file and key holding NaN/Inf.
        """
        for i in range(len(self)):
            if self.check_finite and self._value_key(i, dtype) not in self._checked:
                self.load(i, device, dtype)  # the check is the side effect; the model is freed at once

    def model_sq_norms(self, i: int) -> dict[str, float]:
        """``{key: ‖θ_i[key]‖²}`` of model ``i``'s floating tensors; reads the model unless already known."""
        if i not in self.sq_norms:
            self.load(i)  # records them
        return self.sq_norms[i]

    def model_digest(self, i: int) -> str:
        """:func:`sample_digest` of model ``i`` as stored; reads the model unless already known."""
        if i not in self.digests:
            self.load(i)  # records it
        return self.digests[i]

    def load_stack(self, indices: Sequence[int], device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, subtract: Mapping[str, Tensor] | None = None,
                   keys: Iterable[str] | None = None, *, pin_memory: bool = False) -> StateDict:
        """Models ``indices`` stacked per key: ``{key: Tensor[b, *shape]}``, optionally minus ``subtract[key]``.

        The floating keys are views of ONE ``[b, P]`` buffer (``directions.Stack``; its ``.flat``) when they share
        a dtype. A file whose values were already checked (``check_values``, ``center``) is read one tensor at a
        time straight into its row (safetensors: a plain read into the buffer, no memory map, no copy of the
        whole model): memory b models. A model read for the first time (its NaN/Inf check needs all of it) or
        an in-memory source: b models plus the one being read. ``subtract`` is applied where it lives: a centre
        on the host is subtracted before the copy to ``device``, in its own precision before any cast to a lower
        ``dtype``. ``pin_memory`` (CUDA only): rows are staged in pinned host memory and copied to the device in
        one non-blocking transfer on a side stream, finished before this returns (for ``prefetch_stack``).
        """
        keys = list(self.spec if keys is None else keys)
        device = torch.device(device)
        staged = pin_memory and device.type == "cuda"
        target = {k: (dtype or self.cast_dtype or self.spec[k].dtype) if self.spec[k].dtype.is_floating_point
                  else self.spec[k].dtype for k in keys}
        host = torch.device("cpu") if staged else device
        if keys and len(set(target.values())) == 1:
            stack = directions.empty({k: self.spec[k].shape for k in keys}, len(indices), host,
                                     next(iter(target.values())), pin_memory=staged)
        else:
            stack = directions.Stack({k: torch.empty((len(indices), *self.spec[k].shape), device=host, dtype=target[k])
                                      for k in keys})
            stack.spans = {}
        self._track(stack, len(indices))
        wide = subtract is not None and dtype in (torch.float16, torch.bfloat16)
        read_dtype = None if wide else dtype  # a low-precision stack: subtract in the centre's precision first
        for row, i in enumerate(indices):
            for key, value in self._rows(i, keys, read_dtype, {k: stack[k][row] for k in keys}):
                dest = stack[key][row]
                sub = subtract.get(key) if subtract is not None and dest.is_floating_point() else None
                if value is None:  # read straight into dest (same dtype, on the host)
                    if sub is not None:
                        dest.sub_(sub.to(dest.device))
                    continue
                if sub is not None and (sub.device == value.device or dest.dtype != sub.dtype):
                    value = value.to(device=sub.device, dtype=sub.dtype) - sub  # in the centre's precision
                    sub = None
                dest.copy_(value)
                if sub is not None:
                    dest.sub_(sub)
        if staged:
            stack = self._to_device(stack, device)
            self._track(stack, len(indices))
        return stack

    def _rows(self, i: int, keys: list[str], dtype: torch.dtype | None, dests: Mapping[str, Tensor]):
        """``(key, tensor)`` of model ``i`` for ``load_stack``, one tensor at a time where that is possible.

        A file whose values are known to be finite is read key by key; a safetensors tensor of the dtype asked
        for is read straight into ``dests[key]`` when that is a contiguous host tensor, and ``None`` is yielded.
        """
        source = self.sources[i]
        known = not self.check_finite or self._value_key(i, dtype) in self._checked or i in self.sq_norms
        if isinstance(source, Mapping) or not known:  # in memory (no copy is made), or its first read
            where = next(iter(source.values())).device if isinstance(source, Mapping) and source else "cpu"
            state = self.load(i, where, dtype)
            for key in keys:
                yield key, state[key]
            del state
            return
        path = Path(source)
        if path.suffix != ".safetensors" or sys.byteorder != "little":
            raw = load_state_dict(path)  # zip .pt files are memory-mapped: a key is read when it is copied
            self._check_spec({k: TensorSpec(tuple(v.shape), v.dtype) for k, v in raw.items()}, self.names[i],
                             f"the first checkpoint ({self.names[0]})")
            for key in keys:
                yield key, self._cast(raw[key], "cpu", dtype)
            del raw
            return
        with _SafetensorsReader(path) as reader:
            self._check_spec(reader.spec, self.names[i], f"the first checkpoint ({self.names[0]})")
            for key in keys:
                want = self._cast_dtype(key, dtype)
                dest = dests[key]
                if (reader.spec[key].dtype == want == dest.dtype and dest.device.type == "cpu"
                        and dest.is_contiguous()):
                    reader.read_into(key, dest)
                    yield key, None
                else:
                    yield key, self._cast(reader.read(key), "cpu", dtype)

    def _cast_dtype(self, key: str, dtype: torch.dtype | None) -> torch.dtype:
        spec = self.spec[key]
        return (dtype or self.cast_dtype or spec.dtype) if spec.dtype.is_floating_point else spec.dtype

    @staticmethod
    def _to_device(stack: "directions.Stack", device: torch.device) -> "directions.Stack":
        """A pinned host stack on ``device``: one non-blocking copy on a side stream, waited for here."""
        side = torch.cuda.Stream(device=device)
        if stack.flat is not None:
            out = directions.empty({k: tuple(v.shape[1:]) for k, v in stack.items()}, stack.flat.shape[0], device,
                                   stack.flat.dtype)
            with torch.cuda.stream(side):
                out.flat.copy_(stack.flat, non_blocking=True)
        else:
            out = directions.Stack({k: torch.empty_like(v, device=device) for k, v in stack.items()})
            out.spans = {}
            with torch.cuda.stream(side):
                for k, v in stack.items():
                    out[k].copy_(v, non_blocking=True)
        side.synchronize()  # the pinned staging buffer may be freed and the stack used on any stream
        return out

    def prefetch_stack(self, indices: Sequence[int], **kwargs) -> "Future[StateDict]":
        """``load_stack`` on a background thread; ``.result()`` gives the stack."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soupkit-prefetch")
        return self._executor.submit(self.load_stack, list(indices), **kwargs)

    def center(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               indices: Sequence[int] | None = None,
               each: Callable[[int, StateDict], None] | None = None) -> StateDict:
        """Uniform average θ̄ of the models (all by default), streamed with one fine-tuned model resident.

        Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are taken from the first model. ``each(i,
        state)`` is called with every model as it streams by (read-only), so a caller can accumulate something
        else in the same pass (a warm start's check of the previous soup) without reading the models twice.
        """
        indices = list(range(len(self))) if indices is None else list(indices)
        total: StateDict = {}
        for n, i in enumerate(indices):
            state = self.load(i, device, dtype)
            if each is not None:
                each(i, state)
            for key, value in state.items():
                if not value.is_floating_point():
                    total.setdefault(key, value.clone())
                elif n == 0:
                    total[key] = value.clone()
                else:
                    total[key].add_(value)
            del state
        for key, value in total.items():
            if value.is_floating_point():
                value.div_(len(indices))
        return total


def sample_digest(state: Mapping[str, Tensor], per_tensor: int = 64) -> str:
    """16 hex digits of sha256 over ``per_tensor`` evenly spaced values of every floating tensor (as float64,
    keys sorted, with their names and shapes): a content fingerprint for one gather per tensor.

    Not a hash of every byte: it tells apart fine-tunes of one pretrained model, which differ at every
    coordinate, and a file that was replaced by another; an exact upcast of the same values (float32 read as
    float64) keeps it, any rounding changes it.
    """
    h = hashlib.sha256()
    for key in sorted(k for k, t in state.items() if t.is_floating_point() and t.numel()):
        flat = state[key].reshape(-1)
        n, m = flat.numel(), min(per_tensor, flat.numel())
        # integer positions (exact on every device), first and last element included
        idx = torch.arange(m, dtype=torch.int64) * (n - 1) // max(m - 1, 1)
        values = flat[idx.to(flat.device)].to(torch.float64).cpu()
        h.update(f"{key}{tuple(state[key].shape)}".encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()[:16]
