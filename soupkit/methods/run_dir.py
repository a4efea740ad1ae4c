"""Checkpoints of an HL/MEHL run in ``run_dir``: a run killed at any moment and started again with the same
command resumes from its last finished outer iteration and ends with the same coefficients, bit for bit.

Files in ``run_dir``, each written atomically (temp file + rename), so a kill never leaves half a file:

* ``run.json``: what the run is: method, options, the pool (file names, sizes, tensor layout), the held-out
  set's size, the block schedule; for a warm start (``warm_start``) ``extends``: the result it grows (its
  folder, method, K_old and a digest of its coefficients and soup). A directory holding a state refuses to
  resume any other run.
* ``state.safetensors``: the state after the last finished outer iteration: coefficients ``weights [K, L]``,
  learned ``var [K, L]``, the soup, the loss history, the global RNG and the held-out stream's position,
  and each model's squared norm (compared on resume: a replaced checkpoint of the same size is caught).
  The optimiser and its schedule restart with every block, so a block boundary holds no optimiser state;
  a block interrupted midway is redone from its start.
* ``result/``: the finished :class:`~soupkit.methods.SoupResult` (written by ``make_soup``).
* ``.lock``: an advisory lock held while a process works in the directory (released by the OS on a kill).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from soupkit.config import SoupConfig
from soupkit.errors import CheckpointError, ResumeError
from soupkit.io import atomic_write_json
from soupkit.pool.checkpoint_pool import CheckpointPool
from soupkit.pool.formats import load_state_dict, save_state_dict

if TYPE_CHECKING:  # pragma: no cover
    from soupkit.engine.layers import LayerMap
    from soupkit.engine.batches import BatchStream

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, the rest works
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunDir", "RunState", "describe_run", "forked_rng"]

_MANIFEST, _STATE, _LOCK, _META = "run.json", "state.safetensors", ".lock", "soupkit_run_state"
# options that do not change a single number of the run, so a resume may change them; warm_start does, but it
# is an object: run.json names it by its provenance, under "extends"
_FREE_OPTIONS = {"progress", "prefetch", "run_dir"}
_NOT_IN_OPTIONS = {"warm_start"}


@contextmanager
def forked_rng(device: Any = "cpu") -> Iterator[Callable[[int], None]]:
    """Inside: the global torch RNG (CPU, and ``device`` if CUDA) is the run's own; the caller's comes back on exit.

    Yields ``seed(s)``, which seeds the run's streams: a run is then a function of its seed alone (a shuffling
    held-out loader included), and its RNG state is what a checkpoint saves.
    """
    dev = torch.device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []

    def seed(s: int) -> None:
        torch.default_generator.manual_seed(s)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(s)  # safe before CUDA is initialised, unlike default_generators

    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        yield seed


@dataclass
class RunState:
    """A run after ``blocks_done`` outer iterations: ``weights``/``var`` ``[K, L]``, the soup, the loss history."""

    blocks_done: int
    weights: Tensor
    var: Tensor
    soup: dict[str, Tensor]
    history: list[float]


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device, os.PathLike)):
        return str(value)
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    if hasattr(value, "__len__"):  # a loader: its size is what can be compared
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def describe_run(method: str, cfg: SoupConfig, pool: CheckpointPool, layers: "LayerMap", batches: "BatchStream",
                 blocks: Sequence[Sequence[int]], extends: Mapping[str, Any] | None = None) -> dict:
    """The manifest ``run.json``: everything that must match for a saved state to be resumed (JSON-ready);
    ``extends``: the provenance of the result a warm start grows (absent for a fresh run)."""
    models = [{"name": name, "bytes": None} if isinstance(src, Mapping)
              else {"name": Path(src).name, "bytes": Path(src).stat().st_size}  # the content is checked by norms
              for name, src in zip(pool.names, pool.sources)]
    layout = json.dumps([[k, list(s.shape), str(s.dtype)] for k, s in pool.spec.items()])
    manifest = {
        "format": 1, "method": method, "models": models,
        "options": {k: _jsonable(v) for k, v in cfg.options().items()
                    if k not in _FREE_OPTIONS | _NOT_IN_OPTIONS},  # flat, as before
        "tensors": hashlib.sha256(layout.encode()).hexdigest()[:16], "layers": list(layers.names),
        "heldout": {"examples": batches.examples_per_epoch, "batches": batches.batches_per_epoch},
        "blocks": [list(b) for b in blocks],
    }
    if extends is not None:
        manifest["extends"] = dict(extends)
    return json.loads(json.dumps(manifest))  # the form it has once read back from run.json


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now))
                for d in _differences(saved.get(k), now.get(k), f"{where}.{k}" if where else k)]
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now) and where != "blocks":
        return [d for i, (a, b) in enumerate(zip(saved, now)) for d in _differences(a, b, f"{where}[{i}]")]
    if saved == now:
        return []
    return [f"{where}: {_short(saved)} then, {_short(now)} now"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RunDir:
    """A run directory, locked for this process while open (use as a context manager).

    Args:
        path: the directory (created).
        manifest: :func:`describe_run` of the run about to start.

    Raises:
        ResumeError: another process holds the directory, or it holds a state of a different run.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict) -> None:
        self.path, self.manifest = Path(path), manifest
        self.digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        self.path.mkdir(parents=True, exist_ok=True)
        self._fd = self._lock()
        try:
            for name in (_MANIFEST, _STATE):  # temp files of a writer that was killed mid-write
                for tmp in self.path.glob(f".{name}.tmp*"):
                    tmp.unlink(missing_ok=True)
            self._check_manifest()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> int | None:
        if fcntl is None:
            return None
        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ResumeError(f"{self.path}: another process is running in this run directory") from None
        return fd

    def _check_manifest(self) -> None:
        manifest, state = self.path / _MANIFEST, self.path / _STATE
        if not state.exists():  # nothing to resume: (re)write what this run is
            atomic_write_json(manifest, self.manifest)
            return
        try:
            saved = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise ResumeError(f"{manifest}: cannot be read ({err}), so {state} cannot be resumed; use a new "
                              "run_dir or delete this one") from err
        diffs = _differences(saved, self.manifest)
        if diffs:
            raise ResumeError(f"{self.path} holds a run with different settings, which this one cannot resume: "
                              + "; ".join(diffs[:4]) + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")
                              + ". Use a new run_dir, or delete this one to start over.")

    def close(self) -> None:
        """Release the lock."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def save(self, state: RunState, pool: CheckpointPool, batches: "BatchStream") -> Path:
        """Replace ``state.safetensors`` with ``state`` plus the RNG and the stream's position (one atomic write)."""
        stream = batches.state_dict()
        tensors = {"weights": state.weights, "var": state.var, "rng": torch.get_rng_state(),
                   "history": torch.tensor(state.history, dtype=torch.float64),
                   **{f"soup.{k}": v for k, v in state.soup.items()}}
        if stream["epoch_rng"] is not None:
            tensors["stream.epoch_rng"] = stream["epoch_rng"]
        tensors.update({f"stream.loader_rng.{j}": g for j, g in enumerate(stream["loader_rng"])})
        meta = {"blocks_done": state.blocks_done, "manifest": self.digest, "examples_seen": stream["examples_seen"],
                "position": stream["position"], "sq_norms": {i: sum(n.values()) for i, n in pool.sq_norms.items()}}
        return save_state_dict(tensors, self.path / _STATE, metadata={_META: json.dumps(meta)})

    def restore(self, pool: CheckpointPool, batches: "BatchStream", device: str | torch.device) -> RunState | None:
        """The saved state (None if there is none), with the RNG and ``batches`` put back where they were.

        Raises:
            ResumeError: the state is unreadable, belongs to another manifest, or a model's weights changed.
        """
        path = self.path / _STATE
        if not path.exists():
            return None
        try:
            tensors = load_state_dict(path)
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads(fh.metadata()[_META])
        except (CheckpointError, OSError, KeyError, TypeError, ValueError) as err:
            raise ResumeError(f"{path}: cannot be read ({err}); delete it to restart the run") from err
        if meta["manifest"] != self.digest:
            raise ResumeError(f"{path} was written by another run than {self.path / _MANIFEST} describes; "
                              "delete the run directory to start over")
        for i, saved in meta["sq_norms"].items():
            now = pool.sq_norms.get(int(i))  # known for every model the run has read before this call
            if now is not None and not math.isclose(sum(now.values()), saved, rel_tol=1e-5):
                raise ResumeError(f"{pool.names[int(i)]}: its weights are not those of the run being resumed "
                                  f"(squared norm {sum(now.values()):.6g}, was {saved:.6g})")
        batches.load_state_dict({"examples_seen": meta["examples_seen"], "position": meta["position"],
                                 "epoch_rng": tensors.get("stream.epoch_rng"),
                                 "loader_rng": [tensors[f"stream.loader_rng.{j}"] for j in range(len(
                                     [k for k in tensors if k.startswith("stream.loader_rng.")]))]})
        torch.set_rng_state(tensors["rng"])
        soup = {k.removeprefix("soup."): v.to(device) for k, v in tensors.items() if k.startswith("soup.")}
        return RunState(meta["blocks_done"], tensors["weights"], tensors["var"], soup, tensors["history"].tolist())
