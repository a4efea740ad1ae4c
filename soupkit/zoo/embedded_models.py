"""The small CLIP-style image classifiers of the zoos: an open_clip ViT or ResNet backbone + linear head.

It mirrors the model-soups wrapper at small scale: image features are L2-normalised before a linear
classification head, and parameter names are ``backbone.*``, ``head.weight``, ``head.bias``, so a
state dict of one zoo member can be averaged or interpolated with any other tensor by tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from soupkit.runtime._compat import import_open_clip


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of the classifier (defaults: ~215 k parameters, 16 patches of 7x7 on 28x28 images)."""

    image_size: int = 28
    patch_size: int = 7
    width: int = 64
    layers: int = 4
    heads: int = 2
    mlp_ratio: float = 4.0
    output_dim: int = 64
    num_classes: int = 10
    in_channels: int = 1


class ViTClassifier(nn.Module):
    """``head(normalize(backbone(x)))``: x [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm image features [B, output_dim] for images x [B, C, H, W]."""
        f = self.backbone(x)
        return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for images x [B, C, H, W]."""
        return self.head(self.features(x))


def build_backbone(cfg: ViTConfig) -> nn.Module:
    """open_clip ``VisionTransformer``: x [B, in_channels, H, W] -> features [B, output_dim] (not normalised)."""
    import_open_clip()  # installs the torchvision guard before open_clip's own imports run
    from open_clip.transformer import VisionTransformer

    vit = VisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
        heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.output_dim,
    )
    if cfg.in_channels != vit.conv1.in_channels:
        # open_clip always builds a 3-channel patch embedding; greyscale input gets its own so no
        # parameters are wasted on (and averaged over) three identical channels.
        vit.conv1 = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
    return vit


def build_vit_classifier(cfg: ViTConfig = ViTConfig()) -> ViTClassifier:
    """A freshly initialised classifier (initialisation follows the global torch RNG: seed it first).

    Returns:
        module mapping x [B, cfg.in_channels, cfg.image_size, cfg.image_size] -> logits [B, cfg.num_classes].
    """
    return ViTClassifier(build_backbone(cfg), nn.Linear(cfg.output_dim, cfg.num_classes))


@dataclass(frozen=True)
class ResNetConfig:
    """open_clip ``ModifiedResNet`` (CLIP's ResNets: BatchNorm, 3-conv stem, attention pooling), small.

    Its total stride is 32, so images are zero-padded (with the background value) to ``padded_size``, a
    multiple of 32, before the stem. Defaults: ~0.4 M parameters, 1 bottleneck per stage, 1x1 final map.
    """

    image_size: int = 28
    padded_size: int = 32
    width: int = 8
    layers: tuple[int, ...] = (1, 1, 1, 1)
    heads: int = 4
    output_dim: int = 64
    num_classes: int = 10
    in_channels: int = 1
    arch: str = "resnet"  # tells a serialised config from a ViTConfig (which has no such key)


ModelConfig = Union[ViTConfig, ResNetConfig]


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of ``dataclasses.asdict`` for either config (JSON lists become tuples again)."""
    if d.get("arch") == "resnet":
        return ResNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    return ViTConfig(**d)


# Normalised value of a black pixel (soupkit.zoo.embedded_data: mean 0.2728, std 0.4056), the padding of ResNet inputs.
_BACKGROUND = -0.2728 / 0.4056


def _pad_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: pad x [B, C, H, W] to [B, C, module.image_size, module.image_size] (centred)."""
    x = args[0]
    extra_h, extra_w = module.image_size - x.shape[-2], module.image_size - x.shape[-1]
    if extra_h == 0 and extra_w == 0:
        return args
    pad = (extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2)
    return (F.pad(x, pad, value=_BACKGROUND), *args[1:])


def build_resnet_backbone(cfg: ResNetConfig) -> nn.Module:
    """open_clip ``ModifiedResNet``: x [B, in_channels, H, W] (H, W <= padded_size) -> features [B, output_dim]."""
    if cfg.padded_size % 32:
        raise ValueError(f"padded_size must be a multiple of 32 (the ResNet's stride), got {cfg.padded_size}")
    import_open_clip()
    from open_clip.modified_resnet import ModifiedResNet

    net = ModifiedResNet(layers=list(cfg.layers), output_dim=cfg.output_dim, heads=cfg.heads,
                         image_size=cfg.padded_size, width=cfg.width)
    if cfg.in_channels != net.conv1.in_channels:
        net.conv1 = nn.Conv2d(cfg.in_channels, cfg.width // 2, kernel_size=3, stride=2, padding=1, bias=False)
    net.register_forward_pre_hook(_pad_input)  # a hook, not a wrapper: parameter names stay open_clip's
    return net


def build_classifier(cfg: ModelConfig) -> ViTClassifier:
    """``head(normalize(backbone(x)))`` for a ViT or ResNet config (seed the global torch RNG first).

    Returns:
        module mapping x [B, cfg.in_channels, cfg.image_size, cfg.image_size] -> logits [B, cfg.num_classes].
    """
    if isinstance(cfg, ResNetConfig):
        return ViTClassifier(build_resnet_backbone(cfg), nn.Linear(cfg.output_dim, cfg.num_classes))
    return build_vit_classifier(cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())
