"""The files of a ``soupkit.zoo`` folder: atomic writes, checksums, and the ``models.jsonl`` records.

Every file is written to a temporary name and moved into place with ``os.replace``, so an interrupted
build never leaves a half-written file under a name that is read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .io import apply_umask

ZOO_FILES = ("zoo.json", "models.jsonl", "backbone.safetensors")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save(state: dict[str, torch.Tensor], path: Path, meta: dict[str, Any]) -> str:
    """Save a state dict via a temporary file; returns the final file's sha256."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # One metadata key: the header's metadata map has no fixed order, and byte-identical files need one.
    save_file(tensors, str(tmp), metadata={"soupkit": json.dumps(meta, sort_keys=True)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    apply_umask(tmp)  # safetensors creates files readable by the owner only; teammates read zoos
    os.replace(tmp, path)
    return sha256_file(path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_records(out: Path) -> dict[int, dict[str, Any]]:
    """Lines of models.jsonl whose checkpoint exists with the recorded sha256."""
    path, valid = out / "models.jsonl", {}
    if not path.exists():
        return valid
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            f = out / rec["file"]
            if f.is_file() and sha256_file(f) == rec["sha256"]:
                valid[int(rec["index"])] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn or foreign line: that model is simply retrained
    return valid


def write_records(out: Path, records: dict[int, dict[str, Any]]) -> None:
    atomic_write_text(out / "models.jsonl", "".join(json.dumps(records[i]) + "\n" for i in sorted(records)))


def clear(out: Path) -> None:
    """Delete a zoo's files (and only those) from ``out``."""
    for p in [*(out / name for name in ZOO_FILES), *out.glob("model_*.safetensors")]:
        p.unlink(missing_ok=True)


def remove_stale_temporaries(out: Path) -> None:
    """Temp files left by an interrupted build: never read, just clutter."""
    for stale in out.glob("*.tmp-*"):
        stale.unlink()
