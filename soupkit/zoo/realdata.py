"""Paper-scale datasets from disk: ImageNet (ImageFolder), CIFAR-10/100 (torchvision's files), held-out splits.

Held-out sets are carved out of each training set and never used for fine-tuning:
- ImageNet: 26 images per class (model-soups' 2 %), seeded, or model-soups' own ``imagenet_98_idxs.npy``
  mask (1 = held-out, indexed like ``ImageFolder(train)``) to reproduce their split exactly;
- CIFAR-10/100: a seeded random 10 % of train (MEHL-Soup Appendix B).
The held-out indices are written to a JSON file with the rule, seed and a fingerprint of the training
set, and re-read on later runs, so fine-tuning and every soup see the same split; a file made for
another dataset, rule or seed is refused rather than silently reused.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from soupkit.errors import DataError, ParameterError
from soupkit.io import atomic_write_text, sha256_arrays
from soupkit.runtime._compat import import_open_clip, import_torchvision
from soupkit.zoo.embedded_data import read_split_json, split_indices

__all__ = [
    "HeldoutSplit", "DataSplits", "per_class_heldout", "random_heldout", "mask_heldout",
    "load_or_create_split", "read_split", "clip_transform", "ArrayImageDataset", "read_cifar",
    "write_cifar_dir", "imagenet_splits", "cifar_splits", "dataset_splits",
]

SPLIT_FORMAT = "soupkit-heldout/1"
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclass(frozen=True)
class HeldoutSplit:
    """Indices into a training set: ``heldout`` (for soups) and ``train`` (for fine-tuning), both sorted."""

    heldout: tuple[int, ...]
    train: tuple[int, ...]
    num_samples: int
    rule: str  # "per_class:26", "fraction:0.1" or "mask:imagenet_98_idxs.npy"
    seed: int | None
    fingerprint: str  # sha256 of the training set's file list / labels


@dataclass(frozen=True)
class DataSplits:
    """Fine-tuning train set, held-out set (eval transform), test set, and class names."""

    train: Dataset
    heldout: Dataset
    test: Dataset
    classes: tuple[str, ...]
    split: HeldoutSplit


# ---- split rules -------------------------------------------------------------------------------------------
def per_class_heldout(targets: Sequence[int], per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` random samples of every class (seeded). targets: [N] -> int64 [<=C*k]."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        if len(members) <= per_class:
            raise DataError(f"class {label} has {len(members)} samples; cannot hold out {per_class} "
                             "and keep any for fine-tuning")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def random_heldout(num_samples: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random ``fraction`` of ``num_samples`` (at least one, never all)."""
    if not 0.0 < fraction < 1.0:
        raise ParameterError(f"held-out fraction must be in (0, 1), got {fraction}")
    count = min(max(1, round(num_samples * fraction)), num_samples - 1)
    return np.sort(np.random.default_rng(seed).permutation(num_samples)[:count]).astype(np.int64)


def mask_heldout(mask_file: str | os.PathLike, num_samples: int) -> np.ndarray:
    """Held-out indices from model-soups' ``imagenet_98_idxs.npy`` (0/1 per training image, 1 = held out)."""
    mask = np.load(mask_file, allow_pickle=False)
    if mask.ndim != 1 or len(mask) != num_samples:
        raise DataError(f"{mask_file}: mask of shape {mask.shape} does not match {num_samples} training images")
    return np.flatnonzero(mask.astype(bool)).astype(np.int64)


def _fingerprint(lines: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def read_split(path: str | os.PathLike) -> HeldoutSplit:
    """Read a split JSON written by ``load_or_create_split`` (through the split-file reader of ``embedded_data``)."""
    path = Path(path)
    data = read_split_json(path)
    if data.get("format") != SPLIT_FORMAT:
        raise DataError(f"{path}: not a soupkit held-out split (format {data.get('format')!r})")
    try:
        n = int(data["num_samples"])
        indices = split_indices({"heldout": data["heldout"]}, n, path)["heldout"]
        rule, fingerprint = data["rule"], data["fingerprint"]
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: unreadable split file ({type(err).__name__}: {err})") from err
    heldout = sorted(int(i) for i in indices)
    held = set(heldout)
    return HeldoutSplit(tuple(heldout), tuple(i for i in range(n) if i not in held), n, rule, data.get("seed"),
                        fingerprint)


def load_or_create_split(path: str | os.PathLike, *, num_samples: int, fingerprint: str, rule: str,
                         seed: int | None, make: Callable[[], np.ndarray]) -> HeldoutSplit:
    """Re-read the split at ``path`` if it exists (checking it fits), else ``make()`` it and save it atomically."""
    path = Path(path)
    if path.exists():
        split = read_split(path)
        found = (split.num_samples, split.fingerprint, split.rule, split.seed)
        if found != (num_samples, fingerprint, rule, seed):
            raise DataError(f"{path}: made for another training set or rule (n={split.num_samples}, "
                             f"rule={split.rule}, seed={split.seed}, fingerprint {split.fingerprint[:12]}) than "
                             f"requested (n={num_samples}, rule={rule}, seed={seed}, fingerprint {fingerprint[:12]}); "
                             "use another split file or delete this one")
        return split
    heldout = [int(i) for i in make()]
    payload = {"format": SPLIT_FORMAT, "rule": rule, "seed": seed, "num_samples": num_samples,
               "fingerprint": fingerprint, "heldout": heldout}
    atomic_write_text(path, json.dumps(payload))
    return read_split(path)


# ---- transforms and datasets -------------------------------------------------------------------------------
def clip_transform(preprocess_cfg: Mapping[str, Any], is_train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's image transform for a model's preprocess config (``clip_models.preprocess_config``).

    PIL image -> float tensor [3, size, size], resized (bicubic, shortest side), centre-cropped, normalised.
    """
    open_clip = import_open_clip()
    return open_clip.image_transform(preprocess_cfg["size"], is_train=is_train, mean=preprocess_cfg.get("mean"),
                                     std=preprocess_cfg.get("std"), resize_mode=preprocess_cfg.get("resize_mode"),
                                     interpolation=preprocess_cfg.get("interpolation"),
                                     fill_color=preprocess_cfg.get("fill_color", 0))


class ArrayImageDataset(Dataset):
    """images uint8 [N, H, W, 3] + labels int [N] -> ``(transform(PIL image), label)``."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Callable | None = None) -> None:
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.targets, self.transform = images, [int(t) for t in labels], transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


class _ArraysOnly(pickle.Unpickler):
    # CIFAR files are pickles; allow only what numpy arrays need so a tampered file cannot run code
    _ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("_codecs", "encode"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # written by numpy 1.x (the real files): numpy 2 renamed it
            module = module.replace("numpy.core", "numpy._core", 1)
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return _ArraysOnly(fh, encoding="latin1").load()
    except FileNotFoundError as err:
        raise DataError(f"{path}: missing (expected torchvision's CIFAR layout)") from err
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"{path}: not a CIFAR batch ({err})") from err


def _cifar_class(name: str) -> Any:
    if name not in CIFAR_FOLDERS:
        raise ParameterError(f"unknown CIFAR dataset {name!r}; expected one of {sorted(CIFAR_FOLDERS)}")
    datasets = import_torchvision().datasets
    return datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100


def read_cifar(root: str | os.PathLike, name: str, train: bool, *,
               verify_md5: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """CIFAR from ``root/cifar-10-batches-py`` or ``root/cifar-100-python`` (files as torchvision downloads).

    Returns images uint8 [N, 32, 32, 3], labels int64 [N] (fine labels for CIFAR-100), class names.
    ``verify_md5`` checks each file against torchvision's published checksums (real files only).
    """
    spec = _cifar_class(name)
    folder = Path(root) / spec.base_folder
    files = spec.train_list if train else spec.test_list
    images, labels = [], []
    for file_name, md5 in [*files, (spec.meta["filename"], spec.meta["md5"])]:
        if verify_md5 and not import_torchvision().datasets.utils.check_integrity(str(folder / file_name), md5):
            raise DataError(f"{folder / file_name}: missing or md5 differs from torchvision's {md5}")
    for file_name, _ in files:
        entry = _read_pickle(folder / file_name)
        try:
            data = np.asarray(entry["data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are CHW planes
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{folder / file_name}: not a CIFAR batch ({type(err).__name__}: {err})") from err
    meta = _read_pickle(folder / spec.meta["filename"])
    if not isinstance(meta, dict) or spec.meta["key"] not in meta:
        raise DataError(f"{folder / spec.meta['filename']}: no {spec.meta['key']!r} list of class names")
    classes = tuple(meta[spec.meta["key"]])
    return np.ascontiguousarray(np.concatenate(images)), np.asarray(labels, dtype=np.int64), classes


def write_cifar_dir(root: str | os.PathLike, name: str, train: tuple[np.ndarray, Sequence[int]],
                    test: tuple[np.ndarray, Sequence[int]], classes: Sequence[str]) -> Path:
    """Write images uint8 [N, 32, 32, 3] + labels in torchvision's CIFAR file layout (small stand-ins).

    CIFAR-10's train set is spread over its five batch files. Returns the dataset folder.
    """
    spec = _cifar_class(name)
    folder = Path(root) / spec.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    for files, (images, labels) in ((spec.train_list, train), (spec.test_list, test)):
        parts = np.array_split(np.arange(len(images)), len(files))
        for (file_name, _), idx in zip(files, parts):
            rows = np.asarray(images)[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1).astype(np.uint8)
            entry = {"batch_label": file_name, "data": rows, label_key: [int(labels[i]) for i in idx],
                     "filenames": [f"{file_name}_{i}.png" for i in idx]}
            with open(folder / file_name, "wb") as fh:
                pickle.dump(entry, fh, protocol=2)
    with open(folder / spec.meta["filename"], "wb") as fh:
        pickle.dump({spec.meta["key"]: list(classes)}, fh, protocol=2)
    return folder


def _split_sets(train_base: Dataset, eval_base: Dataset, test: Dataset, split: HeldoutSplit,
                classes: Sequence[str]) -> DataSplits:
    return DataSplits(Subset(train_base, list(split.train)), Subset(eval_base, list(split.heldout)), test,
                      tuple(classes), split)


def imagenet_splits(root: str | os.PathLike, transform: Callable, split_file: str | os.PathLike, *,
                    per_class: int = 26, seed: int = 0, mask_file: str | os.PathLike | None = None,
                    train_transform: Callable | None = None, test_dir: str = "val") -> DataSplits:
    """ImageNet-style folders ``root/train/<class>/*`` and ``root/<test_dir>/<class>/*``.

    Held-out: ``per_class`` seeded images per class of train, or model-soups' mask file if given.
    ``transform`` is used for held-out and test, ``train_transform`` (default ``transform``) for train.
    """
    datasets = import_torchvision().datasets
    root = Path(root)
    train_base = datasets.ImageFolder(str(root / "train"), transform=train_transform or transform)
    test = datasets.ImageFolder(str(root / test_dir), transform=transform)
    if test.classes != train_base.classes:
        raise DataError(f"{root / test_dir}: class folders differ from {root / 'train'}")
    eval_base = copy.copy(train_base)  # same file list, scanned once; only the transform differs
    eval_base.transform = transform
    targets = train_base.targets
    fingerprint = _fingerprint([f"{os.path.relpath(p, root)}\t{t}" for p, t in train_base.samples])
    if mask_file is not None:
        rule, split_seed = f"mask:{Path(mask_file).name}", None
        make = lambda: mask_heldout(mask_file, len(targets))  # noqa: E731
    else:
        rule, split_seed = f"per_class:{per_class}", seed
        make = lambda: per_class_heldout(targets, per_class, seed)  # noqa: E731
    split = load_or_create_split(split_file, num_samples=len(targets), fingerprint=fingerprint, rule=rule,
                                 seed=split_seed, make=make)
    return _split_sets(train_base, eval_base, test, split, train_base.classes)


def cifar_splits(root: str | os.PathLike, name: str, transform: Callable, split_file: str | os.PathLike, *,
                 fraction: float = 0.1, seed: int = 0, train_transform: Callable | None = None,
                 verify_md5: bool = False) -> DataSplits:
    """CIFAR-10/100 (``name`` = "cifar10"/"cifar100") with a seeded random ``fraction`` of train held out."""
    images, labels, classes = read_cifar(root, name, train=True, verify_md5=verify_md5)
    test_images, test_labels, _ = read_cifar(root, name, train=False, verify_md5=verify_md5)
    fingerprint = _fingerprint([name, sha256_arrays(images), sha256_arrays(labels)])
    split = load_or_create_split(split_file, num_samples=len(labels), fingerprint=fingerprint,
                                 rule=f"fraction:{fraction}", seed=seed,
                                 make=lambda: random_heldout(len(labels), fraction, seed))
    return _split_sets(ArrayImageDataset(images, labels, train_transform or transform),
                       ArrayImageDataset(images, labels, transform),
                       ArrayImageDataset(test_images, test_labels, transform), split, classes)


def dataset_splits(dataset: str, root: str | os.PathLike, transform: Callable, split_file: str | os.PathLike, *,
                seed: int = 0, train_transform: Callable | None = None) -> DataSplits:
    """``imagenet`` / ``cifar10`` / ``cifar100`` with the paper's held-out rule (26 per class / 10 %)."""
    if dataset == "imagenet":
        return imagenet_splits(root, transform, split_file, seed=seed, train_transform=train_transform)
    return cifar_splits(root, dataset, transform, split_file, seed=seed, train_transform=train_transform)
