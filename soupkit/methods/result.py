"""What a soup method returns, and how it is saved and read back (atomically, with a consistency check)."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from torch import Tensor, nn

from soupkit.engine.evaluation import accuracy, predict
from soupkit.errors import CheckpointError, DivergenceError
from soupkit.io import atomic_write_json
from soupkit.pool.checkpoint_pool import CheckpointPool
from soupkit.pool.formats import load_state_dict, save_state_dict

__all__ = ["SoupResult", "soup_logits", "evaluate"]

StateDict = dict[str, Tensor]


@dataclass
class SoupResult:
    """What a soup method produced.

    Attributes:
        name: the method.
        state_dict: the soup's weights (None for the ensemble, which has no single model).
        coefficients: weight on each θ_i, ``[K]`` or ``[K, L]`` for the "+" methods; sums to 1 over K for
            every layer (not for the ``decentralize=False`` ablation). Ensemble: weights of the logits.
        layer_names: the L layers of the "+" methods, else None.
        stats: measured ``seconds_total``, ``seconds_per_epoch``, ``epochs``, ``peak_memory_bytes``, ...
        history: training loss per inner step (learned soups) or held-out accuracy per evaluation.
        members: the pool, for the ensemble.
        params: the raw learned variables (softmax logits, hyperplane α), for inspection.
    """

    name: str
    state_dict: StateDict | None
    coefficients: Tensor
    layer_names: list[str] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    members: CheckpointPool | None = None
    params: dict[str, Tensor] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Write ``soup.safetensors``, ``coefficients.safetensors``, then ``result.json``, each atomically.

        All three carry one save id and ``result.json`` comes last, so :meth:`load` of a directory whose save
        was interrupted gives the previous result or an error, never a mix of two. A soup holding NaN is
        refused (DivergenceError) before anything is written (Inf may be legitimate: a mask buffer of -inf).
        """
        directory = Path(directory)
        if self.state_dict is not None:
            bad = [k for k, v in self.state_dict.items() if v.is_floating_point() and torch.isnan(v).any()]
            if bad:
                raise DivergenceError(f"{directory}: the soup holds NaN in {bad[0]!r}; nothing was written")
        tag = {"soupkit_save": uuid.uuid4().hex}
        if self.state_dict is not None:
            save_state_dict(self.state_dict, directory / "soup.safetensors", tag)
        save_state_dict({"coefficients": self.coefficients, **{f"params.{k}": v for k, v in self.params.items()}},
                        directory / "coefficients.safetensors", tag)
        atomic_write_json(directory / "result.json", {
            "name": self.name, "layer_names": self.layer_names, "stats": self.stats, "history": self.history,
            "members": self.members.names if self.members is not None else None,
            "has_soup": self.state_dict is not None, "save": tag["soupkit_save"]})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "SoupResult":
        """Read a result written by :meth:`save` (ensemble members are re-opened from their file names)."""
        directory = Path(directory)
        meta = json.loads((directory / "result.json").read_text())
        tensors = _read_saved(directory / "coefficients.safetensors", meta.get("save"))
        has_soup = meta.get("has_soup", (directory / "soup.safetensors").exists())
        members = meta.get("members")
        return cls(meta["name"], _read_saved(directory / "soup.safetensors", meta.get("save")) if has_soup else None,
                   tensors.pop("coefficients"), meta["layer_names"], meta["stats"], meta["history"],
                   CheckpointPool(members) if members and meta["name"] == "ensemble" else None,
                   {k.removeprefix("params."): v for k, v in tensors.items()})


def _read_saved(path: Path, save_id: str | None) -> StateDict:
    """A file of :meth:`SoupResult.save`, refused if it belongs to another save than ``result.json``."""
    state = load_state_dict(path)
    if save_id is not None:
        with safe_open(str(path), framework="pt") as fh:
            found = (fh.metadata() or {}).get("soupkit_save")
        if found != save_id:
            raise CheckpointError(f"{path}: belongs to another save than result.json beside it "
                                  "(an interrupted save?); save the result again")
    return state


def soup_logits(model: nn.Module, soup: "SoupResult | Mapping[str, Tensor]", loader: Iterable,
                device: str | torch.device | None = None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Logits ``[N, C]`` and labels ``[N]`` over ``loader`` of a :class:`SoupResult` (the ensemble included: the
    weighted mean of its members' logits, one member read at a time) or of a state dict.

    For an ensemble ``loader`` must yield its batches in the same order on every pass (no shuffling).
    """
    if isinstance(soup, SoupResult):
        device = device or soup.stats.get("device", "cpu")
        if soup.state_dict is None:
            if soup.members is None:
                raise ValueError(f"{soup.name!r} has neither a state dict nor ensemble members")
            total, labels = None, None
            weights = soup.coefficients
            for i in range(len(soup.members)):
                state = soup.members.load(i, device)
                logits, y = predict(model, state, loader, device, progress, desc=f"member {i}")
                del state
                total = logits * weights[i] if total is None else total + logits * weights[i]
                if labels is not None and not torch.equal(labels, y):
                    raise ValueError("the loader changed its order between passes: use shuffle=False")
                labels = y
            return total, labels
        soup = soup.state_dict
    return predict(model, soup, loader, device or "cpu", progress)


def evaluate(model: nn.Module, soup: "SoupResult | Mapping[str, Tensor]", loader: Iterable,
             device: str | torch.device | None = None, progress: bool = False) -> float:
    """Top-1 accuracy on ``loader`` of a :class:`SoupResult` (the ensemble included) or a state dict."""
    return accuracy(*soup_logits(model, soup, loader, device, progress))
