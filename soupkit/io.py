"""Atomic file writes (a temp file in the destination folder, then ``os.replace``, so readers never see half a file)
and the sha256 fingerprints of files and arrays."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "sha256_file", "sha256_arrays",
           "default_file_mode", "apply_umask"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Create ``path`` atomically (parents created): ``write(tmp)`` fills a temp file in the same folder, which
    is synced to disk, given the process's default file mode and renamed over ``path``.

    A reader (or a process killed mid-write) sees the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it visible
        apply_umask(tmp)  # safetensors creates files readable by their owner only
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parents created)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_arrays(*arrays: np.ndarray) -> str:
    """Hex sha256 of the arrays' bytes in C order, one after the other (a fingerprint of in-memory data)."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file in this process: 0o666 less the umask (0o644 for umask 022)."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it; put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask(path: str | os.PathLike) -> Path:
    """Give ``path`` the process's default file mode.

    safetensors (and ``tempfile``) create files readable by their owner only (0o600) whatever the umask;
    soups, coefficients and zoos are shared with teammates like any other output file.
    """
    os.chmod(path, default_file_mode())
    return Path(path)
