"""CLIP image classifiers in the state-dict layout of the model-soups checkpoints.

model-soups' ``ModelWrapper`` holds an OpenAI CLIP model as ``model`` and a linear ``classification_head``;
its forward is ``head(normalize(model.encode_image(x)))``. It deletes only ``model.transformer`` (the text
transformer), so the released ``model_{i}.pt`` files also hold six text-side tensors
(``TEXT_LEFTOVER_KEYS``) that never influence image logits. open_clip's ``VisionTransformer`` uses the
same parameter names as OpenAI's, so ``model.visual.*`` needs no renaming.

By default the classifier keeps only the image tower (``model.visual.*`` + ``classification_head.*``) and
``load_model_soups_checkpoint`` drops the text leftovers by name; ``keep_text_leftovers=True`` gives the
exact layout of the released files instead (e.g. to read them unconverted through a checkpoint pool).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soupkit.errors import CheckpointLayoutError
from soupkit.pool.formats import load_state_dict, save_state_dict
from soupkit.runtime._compat import import_open_clip

__all__ = [
    "MODEL_SOUPS_ARCH", "TEXT_LEFTOVER_KEYS", "ImageTower", "SoupClassifier",
    "create_clip", "classifier_from_clip", "build_model_soups_model", "preprocess_config",
    "to_model_soups_layout", "load_model_soups_checkpoint", "load_weights", "convert_checkpoint",
    "register_model_config",
]

MODEL_SOUPS_ARCH = "ViT-B-32-quickgelu"  # OpenAI CLIP ViT-B/32 was trained with QuickGELU
TEXT_LEFTOVER_KEYS: tuple[str, ...] = (
    "model.positional_embedding", "model.text_projection", "model.logit_scale",
    "model.token_embedding.weight", "model.ln_final.weight", "model.ln_final.bias",
)
_TEXT_PREFIXES = ("model.transformer.", "model.token_embedding.", "model.ln_final.")
_TEXT_NAMES = frozenset({"model.positional_embedding", "model.text_projection", "model.logit_scale",
                         "model.logit_bias", "model.attn_mask"})
_SHOW = 8  # how many offending keys an error lists


class ImageTower(nn.Module):
    """Holds an open_clip vision tower as ``visual`` so its keys read ``model.visual.*`` inside the wrapper."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def encode_image(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> features [B, D]."""
        return self.visual(images)


class SoupClassifier(nn.Module):
    """``classification_head(normalize(model.encode_image(images)))``, as model-soups' ``ModelWrapper``.

    Args:
        model: anything with ``encode_image`` (an ``ImageTower`` or a CLIP without its text transformer).
        feature_dim: D, the image embedding width.
        num_classes: C.
        normalize: L2-normalise features before the head (model-soups checkpoints expect True).
        head_weight: optional initial head weight [C, D] (e.g. a zero-shot classifier); the bias starts at 0.
    """

    def __init__(self, model: nn.Module, feature_dim: int, num_classes: int, *, normalize: bool = True,
                 head_weight: Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.classification_head = nn.Linear(feature_dim, num_classes)
        self.normalize = normalize
        with torch.no_grad():
            if head_weight is not None:
                self.classification_head.weight.copy_(head_weight)
            self.classification_head.bias.zero_()

    def features(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> (normalised) features [B, D]."""
        feats = self.model.encode_image(images)
        return F.normalize(feats, dim=-1) if self.normalize else feats

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> logits [B, C]."""
        return self.classification_head(self.features(images))


def create_clip(arch: str = MODEL_SOUPS_ARCH, pretrained: str | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """Full open_clip model (both towers): random weights when ``pretrained`` is None, else a tag or a path."""
    open_clip = import_open_clip()
    return open_clip.create_model(arch, pretrained=pretrained, device=device)


def classifier_from_clip(clip: nn.Module, num_classes: int, *, keep_text_leftovers: bool = False,
                         head_weight: Tensor | None = None) -> SoupClassifier:
    """Wrap an open_clip CLIP as a ``SoupClassifier``; its text transformer is removed (as in model-soups).

    With ``keep_text_leftovers`` the remaining text-side tensors stay (the released files' exact layout);
    otherwise only the vision tower is kept. The CLIP module is modified in place.
    """
    feature_dim = int(clip.visual.output_dim)
    if keep_text_leftovers:
        if hasattr(clip, "transformer"):
            del clip.transformer
        tower: nn.Module = clip
    else:
        tower = ImageTower(clip.visual)
    return SoupClassifier(tower, feature_dim, num_classes, head_weight=head_weight)


def build_model_soups_model(num_classes: int = 1000, arch: str = MODEL_SOUPS_ARCH, *,
                            pretrained: str | None = None, keep_text_leftovers: bool = False,
                            device: str | torch.device = "cpu") -> SoupClassifier:
    """Classifier whose ``state_dict()`` keys equal those of ``load_model_soups_checkpoint`` (same flag).

    The text tower is built and then dropped: open_clip's public factory builds both towers, and that
    also gives the vision tower its preprocessing config (see ``preprocess_config``).
    """
    clip = create_clip(arch, pretrained, device)
    return classifier_from_clip(clip, num_classes, keep_text_leftovers=keep_text_leftovers)


def preprocess_config(model: nn.Module) -> dict[str, Any]:
    """open_clip preprocessing config (size, mean, std, interpolation, resize_mode, ...) of a classifier/CLIP."""
    open_clip = import_open_clip()
    tower = model.model if isinstance(model, SoupClassifier) else model
    return dict(open_clip.get_model_preprocess_cfg(tower))


def _is_text_key(key: str) -> bool:
    return key in _TEXT_NAMES or key.startswith(_TEXT_PREFIXES)


def to_model_soups_layout(state: Mapping[str, Tensor], *, keep_text_leftovers: bool = False) -> dict[str, Tensor]:
    """Rename/drop keys so ``state`` fits ``build_model_soups_model(keep_text_leftovers=...)``.

    Handles, explicitly: a ``module.`` prefix (saved from DataParallel), the open_clip CLIP layout
    (``visual.*`` without ``model.``), the text transformer (always dropped, as ``ModelWrapper`` does)
    and the text leftovers (dropped unless ``keep_text_leftovers``). Other keys pass through unchanged,
    so ``load_weights`` can report them. Tensors are not copied.
    """
    items = list(state.items())
    if items and all(k.startswith("module.") for k, _ in items):
        items = [(k[len("module."):], v) for k, v in items]
    if not any(k.startswith("model.") for k, _ in items) and any(k.startswith("visual.") for k, _ in items):
        items = [(k if k.startswith("classification_head.") else "model." + k, v) for k, v in items]
    out = {}
    for key, value in items:
        if key.startswith("model.transformer.") or key == "model.attn_mask":
            continue
        if _is_text_key(key) and not keep_text_leftovers:
            continue
        out[key] = value
    return out


def load_model_soups_checkpoint(path: str | os.PathLike, *, keep_text_leftovers: bool = False,
                                dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Read a model-soups ``model_{i}.pt`` (or a converted ``.safetensors``) in the classifier's layout.

    Read with ``weights_only=True`` and memory-mapped where the file format allows, so only the tensors
    used are paged in. ``dtype`` (if given) casts floating tensors, which makes a full copy.

    Returns:
        ``{key: Tensor}``: ``model.visual.*`` and ``classification_head.weight`` [C, D] / ``.bias`` [C]
        (plus ``TEXT_LEFTOVER_KEYS`` when ``keep_text_leftovers``).
    """
    state = to_model_soups_layout(load_state_dict(path), keep_text_leftovers=keep_text_leftovers)
    for key in ("classification_head.weight", "classification_head.bias"):
        if key not in state:
            raise CheckpointLayoutError(f"{path}: no {key!r}; is this a model-soups classifier checkpoint?")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "<state dict>") -> None:
    """``model.load_state_dict(state, strict=True)`` with an error listing missing/unexpected/misshapen keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or misshapen:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", misshapen)):
            if keys:
                more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:_SHOW])}{more}")
        raise CheckpointLayoutError(f"{source}: does not fit {type(model).__name__}; " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=True)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write a model-soups ``.pt`` as an image-tower-only ``.safetensors`` (atomic); returns ``dst``."""
    state = load_model_soups_checkpoint(src)
    return save_state_dict(state, dst, metadata={"source": Path(src).name, "layout": "model-soups/visual-only"})


def register_model_config(name: str, config: Mapping[str, Any], directory: str | os.PathLike) -> Path:
    """Save an open_clip model config as ``directory/name.json`` and register it, so ``arch=name`` works.

    ``config`` has open_clip's keys ``embed_dim``, ``vision_cfg``, ``text_cfg`` (and e.g. ``quick_gelu``).
    """
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise ValueError(f"model config {name!r} lacks {missing}")
    path = Path(directory) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(config), indent=1))
    import_open_clip().add_model_config(path)
    return path
