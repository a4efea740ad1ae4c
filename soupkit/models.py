"""The small CLIP-style image classifier every zoo member shares: open_clip ViT backbone + linear head.

It mirrors the model-soups wrapper at small scale: image features are L2-normalised before a linear
classification head, and parameter names are ``backbone.*``, ``head.weight``, ``head.bias``, so a
state dict of one zoo member can be averaged or interpolated with any other tensor by tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from soupkit._compat import import_open_clip


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


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())
