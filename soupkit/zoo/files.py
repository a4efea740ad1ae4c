"""The files of a ``soupkit.zoo`` folder: models saved with their checksums, and the ``models.jsonl`` records.

Every file is written atomically (``soupkit.io.atomic_write``), so an interrupted build never leaves a
half-written file under a name that is read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from soupkit.io import atomic_write_text, sha256_file
from soupkit.pool.formats import save_state_dict

ZOO_FILES = ("zoo.json", "models.jsonl", "backbone.safetensors")


def atomic_save(state: dict[str, torch.Tensor], path: Path, meta: dict[str, Any]) -> str:
    """Save a state dict atomically (``soupkit.pool.formats.save_state_dict``); returns the file's sha256."""
    # One metadata key: the header's metadata map has no fixed order, and byte-identical files need one.
    save_state_dict(state, path, metadata={"soupkit": json.dumps(meta, sort_keys=True)})
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
