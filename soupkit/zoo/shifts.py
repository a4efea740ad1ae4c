"""Distribution-shift test sets: how a zoo's model is scored on them (``ShiftInfo``, ``shift_correct``) and readers
of the five paper-scale shifts of model-soups from their released folder layouts under one ``shift_root``:

- ``imagenet_v2``: ``imagenetv2-matched-frequency-format-val/<class index 0..999>/*.jpeg`` (all 1000 classes);
- ``imagenet_r``: ``imagenet-r/<wnid>/*.jpg`` (200 of the 1000 wnids);
- ``imagenet_sketch``: ``sketch/<wnid>/*.JPEG`` (all 1000);
- ``imagenet_a``: ``imagenet-a/<wnid>/*.jpg`` (200 wnids);
- ``objectnet``: ``objectnet-1.0/images/<folder>/*.png`` with ``objectnet-1.0/mappings/``
  (``folder_to_objectnet_label.json``, ``objectnet_to_imagenet_1k.json``, ``pytorch_to_imagenet_2012_id.json``,
  ``imagenet_to_label_2012_v2``): 113 ObjectNet classes map to one or more ImageNet classes each.

Scoring rules (model-soups' ``datasets/`` and ``utils.test_model_on_dataset``, re-derived, not copied):

- a shift's class ``j`` is a *group* of the model's classes; its score is the largest logit of the group, the
  prediction is the arg-max over the shift's classes (ties: the first), correct iff it equals the label;
- ImageNet-V2 and -Sketch: no groups, the plain 1000-way arg-max (model-soups projects nothing for them);
- ImageNet-R and -A: one class per wnid folder *present in the data set*, in sorted-wnid order; a wnid's ImageNet
  index is its position among the 1000 sorted ImageNet wnids (``ImageFolder``'s order, so the order of the
  checkpoints' heads). model-soups hard-codes the 200 indices and keeps ``logits[:, mask]`` in index order with
  ``ImageFolder`` labels 0..199 over the sorted wnid folders: the same classes and labels, read from the folders
  instead of a list, which is why no class list ships here;
- ObjectNet: the classes of ``objectnet_to_imagenet_1k.json`` (113), sorted by folder name, labels their position;
  a class's score is the *maximum* of the logits of its ImageNet classes (model-soups' ``project_logits``:
  ``np.max(logits[:, ids])``); images of the folders without a mapping (200 of the 313) are left out, as there;
  every image loses 2 pixels on each side first (model-soups' ``crop``), which removes the released images' thin
  red frame.

The five-shift average is their unweighted mean (model-soups' ``main.py``: ``1/5 * (V2 + R + Sketch + ObjectNet +
A)``): :func:`paper_shift_average`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from soupkit.errors import DataError, MissingInputError, ParameterError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image  # Pillow comes with the paper extra (torchvision); the core install has no PIL

__all__ = ["PAPER_SHIFTS", "SHIFT_FOLDERS", "OBJECTNET_BORDER", "OBJECTNET_MAPPING_FILES", "ShiftInfo",
           "shift_predict", "shift_correct", "paper_shift_average", "ShiftDataset", "imagenet_wnids", "available_shifts",
           "read_imagenet_v2", "read_imagenet_r", "read_imagenet_a", "read_imagenet_sketch", "read_objectnet",
           "read_shift"]

PAPER_SHIFTS: tuple[str, ...] = ("imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet")
# the folder each release unpacks to, under the user's shift_root
SHIFT_FOLDERS: dict[str, str] = {"imagenet_v2": "imagenetv2-matched-frequency-format-val", "imagenet_r": "imagenet-r",
                                 "imagenet_sketch": "sketch", "imagenet_a": "imagenet-a", "objectnet": "objectnet-1.0"}
OBJECTNET_BORDER = 2  # pixels cropped on each side of an ObjectNet image, as model-soups' crop does
OBJECTNET_MAPPING_FILES = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
                           "pytorch_to_imagenet_2012_id.json", "imagenet_to_label_2012_v2")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}  # matched case-blind: -R/-A .jpg, Sketch .JPEG, V2 .jpeg, ObjectNet .png


@dataclass(frozen=True)
class ShiftInfo:
    """How logits of a zoo's model are scored on one shift.

    Attributes:
        name: the shift's name (``zoo.shift_names()``).
        num_outputs: logit columns the zoo's models have (ImageNet: 1000).
        groups: None: the labels are the model's classes and the prediction is the plain arg-max; else
            ``groups[j]`` are the model classes of shift class ``j`` (labels are in ``0..len(groups)-1``).
        classes: names of the shift's classes (wnids, ObjectNet folders), for tables; may be empty.
    """

    name: str
    num_outputs: int
    groups: tuple[tuple[int, ...], ...] | None = None
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.groups is not None:
            bad = [g for g in self.groups if not g or any(not 0 <= i < self.num_outputs for i in g)]
            if bad:
                raise DataError(f"shift {self.name!r}: class groups {bad[:3]} are empty or name classes outside the "
                                f"model's 0..{self.num_outputs - 1}")

    @property
    def num_classes(self) -> int:
        """Classes of the shift (the labels' range)."""
        return self.num_outputs if self.groups is None else len(self.groups)


def shift_predict(logits: Tensor, info: ShiftInfo) -> Tensor:
    """Predicted shift classes ``[N]`` (int64, in ``0..info.num_classes - 1``) from logits ``[N, num_outputs]``.

    A shift class's score is the largest logit of its group (a one-class group: that logit, i.e. the logits
    restricted to the subset), the prediction the arg-max over shift classes, first on ties."""
    if logits.ndim != 2 or logits.shape[1] != info.num_outputs:
        raise DataError(f"shift {info.name!r}: logits of shape {tuple(logits.shape)}, expected [N, {info.num_outputs}]")
    if info.groups is None:
        scores = logits
    elif all(len(g) == 1 for g in info.groups):  # a class subset (ImageNet-R/-A): keep those columns
        scores = logits[:, [g[0] for g in info.groups]]
    else:  # ObjectNet: max-pool each group's logits
        scores = torch.stack([logits[:, list(g)].amax(dim=1) for g in info.groups], dim=1)
    return scores.argmax(dim=1)


def shift_correct(logits: Tensor, labels: Tensor, info: ShiftInfo) -> Tensor:
    """Per-image correctness on a shift: logits ``[N, num_outputs]``, labels ``[N]`` (the shift's classes) ->
    bool ``[N]`` (the prediction of :func:`shift_predict`)."""
    predicted = shift_predict(logits, info)
    labels = torch.as_tensor(labels).reshape(-1).to(logits.device)
    if len(labels) != len(logits):
        raise DataError(f"shift {info.name!r}: {len(logits)} rows of logits but {len(labels)} labels")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise DataError(f"shift {info.name!r}: labels outside 0..{info.num_classes - 1}")
    return predicted == labels


def paper_shift_average(accuracies: Mapping[str, float]) -> float:
    """model-soups' "average over the five shifts": the unweighted mean of ``accuracies[s]`` for ``s`` in
    :data:`PAPER_SHIFTS` (each read; a missing one is an error, not a smaller average)."""
    missing = [s for s in PAPER_SHIFTS if s not in accuracies]
    if missing:
        raise ParameterError(f"the five-shift average needs {', '.join(missing)} too (it has {sorted(accuracies)})")
    return sum(float(accuracies[s]) for s in PAPER_SHIFTS) / len(PAPER_SHIFTS)


class ShiftDataset(Dataset):
    """Images of one shift: ``(transform(RGB PIL image), label)``; labels as :class:`ShiftInfo` says.

    Attributes: ``samples`` (path, label) in a fixed order (sorted folders, sorted files), ``targets``, ``info``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], info: ShiftInfo, transform: Callable | None = None,
                 border: int = 0) -> None:
        self.samples, self.info, self.transform, self.border = list(samples), info, transform, border
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> "Image.Image":
        """Image ``index`` as RGB (greyscale, CMYK and palette files too), its border cropped."""
        from PIL import Image  # noqa: PLC0415

        with Image.open(self.samples[index][0]) as image:
            image = image.convert("RGB")
        b = self.border
        if b:
            width, height = image.size
            image = image.crop((b, b, width - b, height - b))
        return image

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load(index)
        return (self.transform(image) if self.transform else image), self.samples[index][1]


# ---- reading the folders ----------------------------------------------------------------------------------------
def _folder(shift_root: str | os.PathLike, name: str) -> Path:
    folder = Path(shift_root) / SHIFT_FOLDERS[name]
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: missing; {name} is read from {SHIFT_FOLDERS[name]}/ under the shift "
                                f"root {shift_root} (the layout of its released archive)")
    return folder


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _IMAGE_SUFFIXES)


def imagenet_wnids(source: str | os.PathLike) -> tuple[str, ...]:
    """The ImageNet wnids in class-index order: the sorted class folders of an ImageNet split folder
    (``<imagenet>/train``), or the lines of a text file (one wnid a line, in index order)."""
    source = Path(source)
    if source.is_dir():
        wnids = tuple(p.name for p in _class_dirs(source))
    elif source.is_file():
        wnids = tuple(line.strip() for line in source.read_text().splitlines() if line.strip())
    else:
        raise MissingInputError(f"{source}: missing; give the ImageNet train folder or a file of wnids")
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{source}: no wnids, or one repeated")
    return wnids


def available_shifts(shift_root: str | os.PathLike) -> tuple[str, ...]:
    """The shifts of :data:`PAPER_SHIFTS` whose folder exists under ``shift_root`` (in that order)."""
    root = Path(shift_root)
    if not root.is_dir():
        raise MissingInputError(f"{root}: the shift root is missing (it holds {', '.join(SHIFT_FOLDERS.values())})")
    return tuple(s for s in PAPER_SHIFTS if (root / SHIFT_FOLDERS[s]).is_dir())


def _checked(samples: list[tuple[str, int]], folder: Path) -> list[tuple[str, int]]:
    if not samples:
        raise DataError(f"{folder}: no images (.jpg, .jpeg, .png) in its class folders")
    return samples


def _wnid_samples(folder: Path, wnids: Sequence[str]) -> tuple[list[tuple[str, int]], list[int], list[str]]:
    """(path, ImageNet index) of every image under ``folder/<wnid>/``, the indices and names of the wnids present."""
    index = {w: i for i, w in enumerate(wnids)}
    present = _class_dirs(folder)
    unknown = [d.name for d in present if d.name not in index]
    if unknown:
        raise DataError(f"{folder}: class folder(s) {', '.join(unknown[:5])} are not ImageNet wnids of the zoo's "
                        f"{len(wnids)} classes (is the wnid list the ImageNet train folder's?)")
    samples = [(path, index[d.name]) for d in present for path in _images(d)]
    return samples, [index[d.name] for d in present], [d.name for d in present]


def read_imagenet_v2(shift_root: str | os.PathLike, num_classes: int,
                     transform: Callable | None = None) -> ShiftDataset:
    """ImageNet-V2 (matched frequency): folder ``k`` holds class ``k``'s images (integer names, not sorted as text)."""
    folder = _folder(shift_root, "imagenet_v2")
    samples = []
    for d in _class_dirs(folder):
        if not d.name.isdigit() or int(d.name) >= num_classes:
            raise DataError(f"{folder / d.name}: ImageNet-V2 folders are class indices 0..{num_classes - 1}")
        samples += [(path, int(d.name)) for path in _images(d)]
    samples.sort(key=lambda s: (s[1], s[0]))
    return ShiftDataset(_checked(samples, folder), ShiftInfo("imagenet_v2", num_classes), transform)


def read_imagenet_sketch(shift_root: str | os.PathLike, wnids: Sequence[str],
                         transform: Callable | None = None) -> ShiftDataset:
    """ImageNet-Sketch: ``sketch/<wnid>/``, scored 1000-way (labels: ImageNet indices)."""
    folder = _folder(shift_root, "imagenet_sketch")
    samples, _, _ = _wnid_samples(folder, wnids)
    return ShiftDataset(_checked(samples, folder), ShiftInfo("imagenet_sketch", len(wnids)), transform)


def _subset(name: str, shift_root: str | os.PathLike, wnids: Sequence[str], transform: Callable | None) -> ShiftDataset:
    folder = _folder(shift_root, name)
    samples, indices, present = _wnid_samples(folder, wnids)
    position = {i: j for j, i in enumerate(indices)}  # sorted wnids -> ascending ImageNet indices
    info = ShiftInfo(name, len(wnids), tuple((i,) for i in indices), tuple(present))
    return ShiftDataset(_checked([(p, position[i]) for p, i in samples], folder), info, transform)


def read_imagenet_r(shift_root: str | os.PathLike, wnids: Sequence[str],
                    transform: Callable | None = None) -> ShiftDataset:
    """ImageNet-R: its wnid folders (200 of 1000) are the class subset; labels: positions in the subset."""
    return _subset("imagenet_r", shift_root, wnids, transform)


def read_imagenet_a(shift_root: str | os.PathLike, wnids: Sequence[str],
                    transform: Callable | None = None) -> ShiftDataset:
    """ImageNet-A: its wnid folders (200 of 1000) are the class subset; labels: positions in the subset."""
    return _subset("imagenet_a", shift_root, wnids, transform)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise MissingInputError(f"{path}: missing; ObjectNet's mappings/ folder holds "
                                f"{', '.join(OBJECTNET_MAPPING_FILES)}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not JSON ({err})") from err


def _objectnet_groups(mappings: Path, num_classes: int) -> tuple[list[str], list[tuple[int, ...]]]:
    """ObjectNet folders (sorted) with a mapping and the ImageNet class indices of each."""
    folder_to_label = _read_json(mappings / "folder_to_objectnet_label.json")
    label_to_names = _read_json(mappings / "objectnet_to_imagenet_1k.json")
    pytorch_to_line = _read_json(mappings / "pytorch_to_imagenet_2012_id.json")
    lines_file = mappings / "imagenet_to_label_2012_v2"
    if not lines_file.is_file():
        raise MissingInputError(f"{lines_file}: missing; ObjectNet's mappings/ folder holds "
                                f"{', '.join(OBJECTNET_MAPPING_FILES)}")
    # the chain: ImageNet name -> its line of imagenet_to_label_2012_v2 (a 2012 id) -> the PyTorch (sorted-wnid) index
    line_of = {line.strip(): i for i, line in enumerate(lines_file.read_text().splitlines())}
    index_of_line = {int(line): int(index) for index, line in pytorch_to_line.items()}
    label_to_folder = {label: folder for folder, label in folder_to_label.items()}
    groups: dict[str, tuple[int, ...]] = {}
    for label, names in label_to_names.items():
        if label not in label_to_folder:
            raise DataError(f"{mappings}: ObjectNet class {label!r} has no folder in folder_to_objectnet_label.json")
        ids = []
        for name in (n.strip() for n in names.split(";")):
            if name not in line_of or line_of[name] not in index_of_line:
                raise DataError(f"{mappings}: ImageNet class {name!r} (of {label!r}) is not in "
                                "imagenet_to_label_2012_v2 / pytorch_to_imagenet_2012_id.json")
            ids.append(index_of_line[line_of[name]])
        if any(i >= num_classes for i in ids):
            raise DataError(f"{mappings}: {label!r} maps to ImageNet indices {ids}, beyond the zoo's "
                            f"{num_classes} classes")
        groups[label_to_folder[label]] = tuple(sorted(ids))
    folders = sorted(groups)
    return folders, [groups[f] for f in folders]


def read_objectnet(shift_root: str | os.PathLike, num_classes: int, transform: Callable | None = None,
                   border: int = OBJECTNET_BORDER) -> ShiftDataset:
    """ObjectNet's mapped classes (113): labels are positions among the sorted mapped folders, each scored by the max
    logit of its ImageNet classes; images of unmapped folders are left out; ``border`` pixels cropped per side."""
    folder = _folder(shift_root, "objectnet")
    folders, groups = _objectnet_groups(folder / "mappings", num_classes)
    images = folder / "images"
    if not images.is_dir():
        raise MissingInputError(f"{images}: missing (ObjectNet's images/<folder>/*.png)")
    samples = [(path, j) for j, name in enumerate(folders) if (images / name).is_dir()
               for path in _images(images / name)]
    info = ShiftInfo("objectnet", num_classes, tuple(groups), tuple(folders))
    return ShiftDataset(_checked(samples, images), info, transform, border=border)


def read_shift(name: str, shift_root: str | os.PathLike, wnids: Sequence[str],
               transform: Callable | None = None) -> ShiftDataset:
    """Shift ``name`` of :data:`PAPER_SHIFTS` under ``shift_root``; ``wnids``: the zoo's ImageNet classes in index
    order (:func:`imagenet_wnids`)."""
    if name not in PAPER_SHIFTS:
        raise ParameterError(f"unknown shift {name!r}; expected one of {PAPER_SHIFTS}")
    if name == "imagenet_v2":
        return read_imagenet_v2(shift_root, len(wnids), transform)
    if name == "objectnet":
        return read_objectnet(shift_root, len(wnids), transform)
    reader = {"imagenet_r": read_imagenet_r, "imagenet_a": read_imagenet_a, "imagenet_sketch": read_imagenet_sketch}
    return reader[name](shift_root, wnids, transform)
