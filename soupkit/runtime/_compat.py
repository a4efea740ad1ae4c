"""Import guards for the PyPI torchvision wheel on a CPU-only torch build.

PyPI's torchvision wheel carries compiled ops linked against CUDA torch; with a CPU torch build
``import torchvision`` fails with ``RuntimeError: operator torchvision::nms does not exist``
(pytorch/vision#9085). The pure-Python parts (transforms, models) that open_clip and timm need still
work once the two operator schemas exist. The work-around below acts ONLY on that exact error, so on
a machine where torchvision imports normally it does nothing.

``import_open_clip`` also registers the open_clip model configs named by ``SOUPKIT_OPEN_CLIP_CONFIGS`` (JSON files
or folders of them, ``os.pathsep``-separated): an architecture of one's own then resolves by name in every process
that a run starts (notebook kernels, isolated soups), as open_clip's own configs do.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

_FRAGMENT: "torch.library.Library | None" = None  # kept alive for the process: the schemas live with it
_MISSING_OP = "operator torchvision::nms does not exist"
MODEL_CONFIGS_ENV = "SOUPKIT_OPEN_CLIP_CONFIGS"
_REGISTERED: set[str] = set()  # config paths already added in this process


def _define_missing_schemas() -> None:
    global _FRAGMENT
    if _FRAGMENT is None:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _FRAGMENT = lib


def import_torchvision() -> ModuleType:
    """Import torchvision, patching the missing-operator error of CPU torch + PyPI torchvision."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if _MISSING_OP not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop the half-imported package before the second attempt
    _define_missing_schemas()
    return importlib.import_module("torchvision")


def import_open_clip() -> ModuleType:
    """Import open_clip (which imports torchvision) with the guard above applied first, and register the model
    configs of ``SOUPKIT_OPEN_CLIP_CONFIGS`` (once per path and process)."""
    import_torchvision()
    open_clip = importlib.import_module("open_clip")
    for entry in os.environ.get(MODEL_CONFIGS_ENV, "").split(os.pathsep):
        if entry and entry not in _REGISTERED:
            if not os.path.exists(entry):
                raise FileNotFoundError(f"{MODEL_CONFIGS_ENV} names {entry!r}, which does not exist")
            open_clip.add_model_config(entry)
            _REGISTERED.add(entry)
    return open_clip


def torchvision_patched() -> bool:
    """True when the work-around was needed in this process."""
    return _FRAGMENT is not None
