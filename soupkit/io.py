"""Atomic file writes: a temp file in the destination folder, then ``os.replace``, so readers never see half a file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "atomic_write_json", "default_file_mode", "apply_umask"]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


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
