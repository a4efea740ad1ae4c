"""CLIP's zero-shot classifier as a checkpoint: θ_0 of model-soups' fine-tunes, which the release does not include.

``python -m soupkit.zoo.zeroshot --arch ViT-B-32-quickgelu --pretrained openai --out checkpoints/model-soups/zeroshot.safetensors``

model-soups fine-tuned every one of its 72 checkpoints from this model: the pretrained image tower with a head
whose rows are the normalised mean text embeddings of the class names over OpenAI's 80 ImageNet templates, times
CLIP's logit scale, and a zero bias (their ``zeroshot.py``). Model Stock and task arithmetic need it
(``prepare_zoo(..., pretrained=...)``, notebook 01's ``pretrained``). The file has the released checkpoints'
layout (text transformer removed, its six leftover tensors kept), so ``CheckpointPool`` takes it beside them.
Building it needs the pretrained CLIP weights (open_clip downloads them once, or reads its cache).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from soupkit.errors import OneLineArgumentParser
from soupkit.pool.formats import save_state_dict
from soupkit.runtime._compat import import_open_clip
from soupkit.zoo.clip import MODEL_SOUPS_ARCH, classifier_from_clip, create_clip

__all__ = ["zeroshot_head", "zeroshot_state_dict", "write_zeroshot", "main"]

Template = str | Callable[[str], str]


def zeroshot_head(clip: nn.Module, arch: str, classnames: Sequence[str], templates: Sequence[Template],
                  device: str | torch.device = "cpu", progress: bool = False) -> Tensor:
    """Head weight ``[C, D]`` on ``clip``'s device: per class the unit mean of the unit text embeddings of
    ``templates`` filled with its name, times ``exp(clip.logit_scale)`` (model-soups' zero-shot head; bias 0)."""
    open_clip = import_open_clip()
    with torch.no_grad():
        text = open_clip.build_zero_shot_classifier(clip, open_clip.get_tokenizer(arch), list(classnames),
                                                    list(templates), device=device, use_tqdm=progress)  # [D, C]
        return (text.T * clip.logit_scale.exp()).float()


def zeroshot_state_dict(arch: str = MODEL_SOUPS_ARCH, pretrained: str | None = "openai",
                        classnames: Sequence[str] | None = None, templates: Sequence[Template] | None = None,
                        device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Tensor]:
    """The zero-shot classifier's state dict in model-soups' checkpoint layout (``model.*`` with the text
    leftovers, ``classification_head.weight [C, D]``, ``.bias [C]``). Defaults: ImageNet's 1 000 class names and
    OpenAI's 80 templates (open_clip's copies of them, as model-soups used)."""
    open_clip = import_open_clip()
    classnames = open_clip.IMAGENET_CLASSNAMES if classnames is None else classnames
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES if templates is None else templates
    clip = create_clip(arch, pretrained, device).eval()
    head = zeroshot_head(clip, arch, classnames, templates, device, progress)
    model = classifier_from_clip(clip, len(classnames), keep_text_leftovers=True, head_weight=head)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def write_zeroshot(out: str | os.PathLike, arch: str = MODEL_SOUPS_ARCH, pretrained: str | None = "openai",
                   device: str | torch.device = "cpu", progress: bool = True) -> Path:
    """Write :func:`zeroshot_state_dict` (ImageNet) to ``out`` (``.safetensors``); returns the path."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: write the zero-shot model as .safetensors (safe to load, no pickle)")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = zeroshot_state_dict(arch, pretrained, device=device, progress=progress)
    save_state_dict(state, out, metadata={"kind": "zero-shot", "arch": arch, "pretrained": str(pretrained)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m soupkit.zoo.zeroshot", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default=MODEL_SOUPS_ARCH, help="open_clip architecture of the fine-tunes")
    parser.add_argument("--pretrained", default="openai",
                        help="open_clip pretrained tag or weights file the fine-tunes started from "
                             "(none: random weights, for a dry run)")
    parser.add_argument("--out", required=True, help="the .safetensors file to write (beside the checkpoints)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    pretrained = None if args.pretrained.lower() in ("", "none") else args.pretrained
    path = write_zeroshot(args.out, args.arch, pretrained, args.device, progress=not args.no_progress)
    print(f"wrote {path}: pass it as pretrained= (notebook 01) for Model Stock and task arithmetic")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
