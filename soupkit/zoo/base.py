"""What every zoo offers, embedded (``soupkit.zoo.build.Zoo``) or made elsewhere (``soupkit.zoo.sources.ExternalZoo``):
the experiments and notebooks use only this interface."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader

__all__ = ["BaseZoo", "image_input_shape"]


def image_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input of ``model``, read from its image tower (open_clip's ``VisionTransformer`` and
    ``ModifiedResNet`` carry ``image_size`` and a first convolution ``conv1``); 3 x 224 x 224 without one."""
    tower = next((m for m in model.modules() if hasattr(m, "image_size") and isinstance(getattr(m, "conv1", None),
                                                                                         nn.Conv2d)), None)
    if tower is None:
        return (3, 224, 224)
    size = tower.image_size
    height, width = (size[0], size[1]) if isinstance(size, (tuple, list)) else (size, size)
    return (int(tower.conv1.in_channels), int(height), int(width))


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
    def loaders(self, heldout_size: int | None = None, batch_size: int = 128, eval_batch_size: int = 500,
                select_fraction: float = 0.0, seed: int = 0) -> dict[str, DataLoader | None]:
        """``learn`` (shuffled held-out part for the coefficients), ``select`` (held-out part for early stopping,
        or None), ``heldout`` and ``test`` (fixed order, for evaluation)."""

    @abstractmethod
    def describe(self) -> str:
        """A figure-title phrase naming the zoo and its scale ("embedded zoo: 32 ViT fine-tunes on Animal-MNIST")."""

    def summary(self) -> dict[str, Any]:
        """One table row describing the zoo."""
        return {"zoo": self.describe()}

    def input_shape(self, model: nn.Module | None = None) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input image (no batch dimension), as the models take it; by default read from the
        image tower of ``model`` (or of :meth:`make_model`, which builds one) with :func:`image_input_shape`."""
        return image_input_shape(model if model is not None else self.make_model())

    @property
    def linear_probe_accuracy(self) -> float | None:
        """Test accuracy (fraction) of the linear probe every fine-tune started from, where the zoo knows it."""
        return None
