"""What every zoo offers, embedded (``soupkit.zoo.build.Zoo``) or made elsewhere (``soupkit.zoo.sources.ExternalZoo``):
the experiments and notebooks use only this interface."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader

from soupkit.config import MAIN_TABLE_SETTINGS

__all__ = ["BaseZoo"]


class BaseZoo(ABC):
    """K fine-tunes of one pretrained model with their data.

    Attributes (of the subclasses): ``out_dir``, the zoo's folder; ``records``, one dict per model with at least
    ``index``, ``heldout_acc`` and ``test_acc`` (fractions).
    """

    out_dir: Path
    records: tuple[dict[str, Any], ...]

    @property
    @abstractmethod
    def paths(self) -> list[Path]:
        """``paths[i]``: model i's checkpoint file."""

    @abstractmethod
    def make_model(self) -> nn.Module:
        """A module of the zoo's architecture (random weights) whose ``state_dict`` keys are the checkpoints'."""

    @abstractmethod
    def tensors(self, split: str, n: int | None = None) -> tuple[Tensor, Tensor]:
        """Images ``x [n, C, H, W]`` and labels ``y [n]`` of a split (``finetune``, ``heldout``, ``test``) in memory;
        ``n`` None: all of it."""

    @abstractmethod
    def loaders(self, heldout_size: int | None = None, batch_size: int = MAIN_TABLE_SETTINGS["batch_size"],
                eval_batch_size: int = MAIN_TABLE_SETTINGS["eval_batch_size"],
                select_fraction: float = MAIN_TABLE_SETTINGS["select_fraction"],
                seed: int = 0) -> dict[str, DataLoader | None]:
        """``learn`` (shuffled held-out part for the coefficients), ``select`` (held-out part for early stopping,
        or None), ``heldout`` and ``test`` (fixed order, for evaluation)."""

    @abstractmethod
    def describe(self) -> str:
        """A figure-title phrase naming the zoo and its scale ("embedded zoo: 32 ViT fine-tunes on Animal-MNIST")."""

    def summary(self) -> dict[str, Any]:
        """One table row describing the zoo."""
        return {"zoo": self.describe()}

    @property
    def linear_probe_accuracy(self) -> float | None:
        """Test accuracy (fraction) of the linear probe every fine-tune started from, where the zoo knows it."""
        return None
