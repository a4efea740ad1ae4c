"""What every zoo offers, embedded (``soupkit.zoo.build.Zoo``) or made elsewhere (``soupkit.zoo.sources.ExternalZoo``):
the experiments and notebooks use only this interface."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader

from soupkit.config import MAIN_TABLE_SETTINGS
from soupkit.errors import ParameterError
from soupkit.zoo.shifts import ShiftInfo

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

    Distribution shifts: ``shift_names()`` (none unless a subclass has some), ``shift_loader(name)`` and
    ``shift_info(name)``, scored per image by ``soupkit.zoo.shifts.shift_correct``.
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

    def shift_names(self) -> tuple[str, ...]:
        """The zoo's distribution-shift test sets (none by default); each is scored with :meth:`shift_info`."""
        return ()

    def shift_info(self, name: str) -> ShiftInfo:
        """How logits are scored on shift ``name`` (class subsets, ObjectNet's groups): pass it with the logits
        and labels of :meth:`shift_loader` to ``soupkit.zoo.shifts.shift_correct``."""
        self._check_shift(name)
        raise NotImplementedError(f"{type(self).__name__} lists shift {name!r} but does not describe it")

    def shift_loader(self, name: str, eval_batch_size: int = 500) -> DataLoader:
        """Shift ``name``'s images and labels in a fixed order: (x [B, C, H, W], y [B])."""
        self._check_shift(name)
        raise NotImplementedError(f"{type(self).__name__} lists shift {name!r} but has no loader for it")

    def _check_shift(self, name: str) -> None:
        if name not in self.shift_names():
            names = ", ".join(self.shift_names()) or "none"
            raise ParameterError(f"{self.describe()} has no shift {name!r}; its shifts: {names}")

    def summary(self) -> dict[str, Any]:
        """One table row describing the zoo."""
        return {"zoo": self.describe()}

    def input_shape(self, model: nn.Module | None = None) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input image (no batch dimension), as the models take it; by default read from the
        image tower of ``model`` (or of :meth:`make_model`, which builds one) with :func:`image_input_shape`."""
        return image_input_shape(model if model is not None else self.make_model())

    @property
    def pretrained_path(self) -> Path | None:
        """The checkpoint every fine-tune started from (θ_0: pretrained weights and the head they were tuned
        from), for the methods that need it (``CheckpointPool(..., pretrained=...)``); None where the zoo does
        not know it."""
        return None

    @property
    def linear_probe_accuracy(self) -> float | None:
        """Test accuracy (fraction) of the linear probe every fine-tune started from, where the zoo knows it."""
        return None
