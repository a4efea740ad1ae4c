"""Checkpoint files: reading and writing state dicts (``.safetensors``; ``.pt``/``.pth`` with
``weights_only=True``), their tensors' specs, and a reader that fills preallocated buffers tensor by tensor.

Every parse failure is a :class:`CheckpointError` naming the file; a pickle that would run code is refused.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from soupkit.errors import CheckpointError
from soupkit.io import atomic_write

__all__ = ["TensorSpec", "load_state_dict", "save_state_dict"]

StateDict = dict[str, Tensor]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{code: getattr(torch, name) for code, name in [
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2")] if hasattr(torch, name)},
}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


class _Loaded(dict):
    """A state dict the pool handed out; a dict subclass so the pool can see when it is freed."""


def _read_pt(path: Path) -> Mapping[str, object]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        # legacy (non-zip) torch.save files cannot be memory-mapped; read them whole, still without code
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a state dict from ``.safetensors`` or ``.pt``/``.pth`` without running any pickled code.

    Raises:
        CheckpointError: missing, unreadable, corrupt or unsafe file, or entries that are not tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: " + ("not a file" if path.exists() else "file not found"))
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = _read_pt(path)
    except Exception as err:  # noqa: BLE001  any way an untrusted file fails to parse is the file's fault
        raise CheckpointError(f"{path}: cannot be read as a safe state dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: key {key!r} is a {type(value).__name__}, not a tensor")
    return dict(state)


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` to ``path`` (safetensors) atomically: a temp file in the same folder, then a rename.

    A reader (or a process killed mid-write) sees the old file or the new one, never half of one.
    """
    # contiguous copies: safetensors refuses tensors that share storage (tied weights)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


class _SafetensorsReader:
    """Reads single tensors of a ``.safetensors`` file with plain reads (no memory map: RSS grows by what is kept).

    Format: an 8-byte little-endian header length, a JSON header ``{key: {dtype, shape, data_offsets}}``, then
    the data; offsets are relative to the end of the header. Every header entry is checked against the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = open(path, "rb")  # noqa: SIM115  closed in __exit__
        try:
            size = os.fstat(self.fh.fileno()).st_size
            n = int.from_bytes(self.fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(self.fh.read(n))
            self.base = 8 + n
            self.entries: dict[str, tuple[int, int]] = {}
            self.spec: dict[str, TensorSpec] = {}
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise ValueError(f"key {key!r} has dtype {entry['dtype']}, which soupkit does not read")
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                if end - begin != nbytes or begin < 0 or self.base + end > size:
                    raise ValueError(f"key {key!r}: offsets {begin}..{end} do not hold {list(shape)} {dtype}")
                self.entries[key], self.spec[key] = (begin, nbytes), TensorSpec(shape, dtype)
        except Exception as err:  # noqa: BLE001  an untrusted file failing to parse is the file's fault
            self.fh.close()
            raise CheckpointError(f"{path}: cannot be read as safetensors ({type(err).__name__}: {err})") from err

    def __enter__(self) -> "_SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()

    def read_into(self, key: str, dest: Tensor) -> None:
        """Fill the contiguous host tensor ``dest`` (the key's shape and dtype) with the key's bytes."""
        begin, nbytes = self.entries[key]
        view = dest.detach().reshape(-1).view(torch.uint8).numpy()
        self.fh.seek(self.base + begin)
        if self.fh.readinto(memoryview(view)) != nbytes:
            raise CheckpointError(f"{self.path}: the data of key {key!r} is truncated")

    def read(self, key: str) -> Tensor:
        spec = self.spec[key]
        out = torch.empty(spec.shape, dtype=spec.dtype)
        self.read_into(key, out)
        return out
