"""The recipe of an embedded zoo as one frozen dataclass (``ZooConfig``): what ``soupkit.zoo.build`` builds."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from soupkit.zoo.embedded_data import DEFAULT_SPLIT_NAME
from soupkit.zoo.embedded_models import ModelConfig, ViTConfig, model_config_from_dict

__all__ = ["ZooConfig"]


@dataclass(frozen=True)
class ZooConfig:
    """Every knob of the recipe. Defaults: the measured K = 32 zoo of the module docstring."""

    k: int = 32
    model: ModelConfig = field(default_factory=ViTConfig)  # a ViTConfig or a ResNetConfig
    split_name: str = DEFAULT_SPLIT_NAME
    # None: the committed split file ``split_name``; an int: splits drawn afresh with
    # ``data.make_splits(labels, <the committed file's sizes>, split_seed)``, written inside the zoo folder
    # (``seeded_split_name``). The committed file is split seed 0, so split_seed=0 gives the same images.
    split_seed: int | None = None
    # The fine-tuning task (soupkit.zoo.embedded_data.TASKS): its images fill the fine-tune / held-out / test splits;
    # pre-training always uses the clean images, so zoos of several tasks can share one backbone.
    task: str = "animal_mnist"
    batch_size: int = 128
    warmup_frac: float = 0.1
    # Pre-training: coarse labels (label % 5) keep the backbone from solving the 10-way task outright,
    # which leaves fine-tuning something to add (NOTES.md: full labels left greedy soups of one model).
    # 60 epochs on the 2 000 pre-training images: 30 epochs gave a linear probe of 0.72 test, 60 gave
    # 0.79; a higher lr for fewer epochs (2e-3 x 40, 3e-3 x 30) gave 0.77 and 0.74.
    pretrain_source: str = "animal_coarse"
    pretrain_epochs: int = 60
    pretrain_lr: float = 1e-3
    pretrain_weight_decay: float = 0.05
    pretrain_aug: float = 1.0
    pretrain_seed: int = 0
    # Linear probe on frozen, L2-normalised features of the fine-tune split (full batch). Features have
    # unit norm, so the head needs large weights: 300 steps at lr 0.05 under-fit (0.69 vs 0.72 test).
    lp_steps: int = 1000
    lp_lr: float = 0.1
    lp_weight_decay: float = 0.0
    # Random search of the fine-tunes. Shorter runs, epochs (2, 3, 4) or (3, 4, 5, 6), were cheaper but
    # left greedy soups within noise of the best single model.
    search_seed: int = 0
    lr_range: tuple[float, float] = (1e-4, 3e-3)  # log-uniform
    weight_decay_choices: tuple[float, ...] = (0.0, 1e-4, 1e-2, 0.1)
    epoch_choices: tuple[int, ...] = (4, 6, 8)
    label_smoothing_choices: tuple[float, ...] = (0.0, 0.1)
    aug_choices: tuple[float, ...] = (0.0, 0.5)
    # Prefixes of the splits (None = whole split): for tests and quick looks.
    max_pretrain: int | None = None
    max_finetune: int | None = None
    max_eval: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ZooConfig":
        """Inverse of ``to_dict`` (JSON turns tuples into lists; turn them back). Keys added to the recipe
        after a zoo was written (``task``) are missing from its zoo.json and take their defaults."""
        kw = dict(d)
        kw["model"] = model_config_from_dict(kw["model"])
        for f in dataclasses.fields(cls):
            if isinstance(kw.get(f.name), list):
                kw[f.name] = tuple(kw[f.name])
        return cls(**kw)
