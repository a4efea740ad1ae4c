"""Stand-ins for the paper preset's inputs, in their real on-disk formats, so ``presets/rehearsal.yaml`` runs every
notebook through its paper-scale branch on a CPU (``python -m soupkit.experiments.rehearsal --out DIR``).

Under ``DIR`` (the same bytes on every run: fixed seeds):

- ``configs/``: open_clip model configs of reduced width standing in for ViT-B-32-quickgelu, ViT-L-14-quickgelu
  and RN101-quickgelu (same kinds of towers and key names); kernels and soups find them by name through
  ``SOUPKIT_OPEN_CLIP_CONFIGS`` (``soupkit.runtime._compat``), which :func:`setup` returns for the runner;
- ``release/``: ``model_{i}.pt`` as model-soups saves them (``torch.save`` of its ``ModelWrapper``'s state dict:
  ``model.visual.*``, the text-tower leftovers, ``classification_head.*``) and ``checksums.json``; they reach
  ``checkpoints/model-soups/`` through ``python -m soupkit.zoo.hub`` from a local HTTP server (127.0.0.1, an
  ephemeral port), with those file names and checksums; ``zeroshot.safetensors``, their start point, is copied
  beside them (where a user's ``python -m soupkit.zoo.zeroshot`` writes θ_0; Model Stock, task arithmetic);
- ``imagenet/{train,val}/<wnid>/*.JPEG`` (ImageFolder; one greyscale and one CMYK JPEG, as ImageNet has) and
  ``imagenet_98_idxs.npy`` (model-soups' held-out mask: 1 = held out, 26 per class);
- ``shifts/``: the five distribution-shift test sets of model-soups in their released layouts
  (``soupkit.zoo.shifts``) over the ImageNet stand-in's classes, a few images per class: ``imagenetv2-matched-
  frequency-format-val/<index>/*.jpeg`` (all 10), ``imagenet-r/<wnid>/*.jpg`` and ``imagenet-a/<wnid>/*.jpg``
  (subsets of 6 and 4 wnids), ``sketch/<wnid>/*.JPEG`` (all 10), ``objectnet-1.0/images/<folder>/*.png`` (a red
  1-pixel frame) with its four ``mappings/`` files (4 mapped classes of 1-3 ImageNet classes, one unmapped folder);
- ``cifar/cifar-10-batches-py`` and ``cifar/cifar-100-python``: pickles as the published files (protocol 2,
  Python 2 strings for keys and array bytes, numpy 1.x class paths);
- ``zoos/{vitl14_cifar10,vitl14_cifar100,rn101_cifar100}``: ``python -m soupkit.zoo.sweep`` folders (notebooks 03
  and 09), made by the sweep itself on the stand-in CIFAR.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from soupkit.io import atomic_write_json, sha256_file
from soupkit.pool.formats import save_state_dict

__all__ = ["ARCHS", "Sizes", "write_configs", "write_model_soups_release", "write_imagenet", "write_shifts",
           "write_cifar", "write_sweeps", "serve", "download_release", "make_inputs", "setup", "main"]

# reduced-width open_clip configs, named after the architectures of presets/paper.yaml
ARCHS: dict[str, dict[str, Any]] = {
    "rehearsal-ViT-B-32-quickgelu": {
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1}},
    "rehearsal-ViT-L-14-quickgelu": {
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 56, "layers": 2, "width": 64, "patch_size": 14, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1}},
    "rehearsal-RN101-quickgelu": {  # a ModifiedResNet (BatchNorm), as RN101, one block per stage
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None, "head_width": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1}},
}
VIT_B32, VIT_L14, RN101 = ARCHS
# the first ten ImageNet-1k classes (ImageFolder sorts them in this order)
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041", "n01514668",
         "n01514859", "n01518878")
# their ImageNet class names (ObjectNet's mappings name ImageNet classes, not wnids)
IMAGENET_NAMES = ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray",
                  "cock", "hen", "ostrich")
# the stand-in shifts' class subsets (indices into WNIDS): ImageNet-R's are the real subset's members among the first
# ten classes; ImageNet-A has only one there (6), so its stand-in subset is made up
IMAGENET_R_CLASSES = (1, 2, 4, 6, 8, 9)
IMAGENET_A_CLASSES = (0, 3, 6, 7)
# ObjectNet stand-in: folder -> (ObjectNet label, its ImageNet classes); None: a folder without an ImageNet class
# (as 200 of the real 313), whose images the reader leaves out
OBJECTNET_CLASSES: dict[str, tuple[str, tuple[int, ...] | None]] = {
    "air_freshener": ("Air freshener", None), "aquarium_fish": ("Aquarium fish", (1,)),
    "poultry": ("Poultry", (7, 8)), "ray": ("Ray", (5, 6)), "shark": ("Shark", (2, 3, 4))}
SHIFT_PER_CLASS = 2  # images per class of every stand-in shift
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MASK_NAME = "imagenet_98_idxs.npy"
CHECKSUMS_NAME = "checksums.json"
ZEROSHOT_NAME = "zeroshot.safetensors"  # θ_0 of the stand-in checkpoints (paper.yaml: the same name)
HELDOUT_PER_CLASS = 26  # model-soups' held-out images per ImageNet class
SEED = 0


@dataclass(frozen=True)
class Sizes:
    """How big the stand-ins are (the defaults: what presets/rehearsal.yaml expects)."""

    num_models: int = 4  # model-soups checkpoints (the release has 72)
    train_per_class: int = 30  # ImageNet train images per class, 26 of them held out
    val_per_class: int = 6
    cifar_train: int = 400
    cifar_test: int = 100
    sweep_models: int = 2  # fine-tunes per sweep folder (the paper's sweeps: 32)
    sweep_steps: int = 2  # optimizer steps per fine-tune


def write_configs(folder: Path) -> Path:
    """One ``<arch>.json`` per entry of :data:`ARCHS` in ``folder`` (what ``SOUPKIT_OPEN_CLIP_CONFIGS`` names)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, config in ARCHS.items():
        (folder / f"{name}.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def _register(folder: Path) -> None:
    from soupkit.runtime._compat import import_open_clip  # noqa: PLC0415  (open_clip only where used)

    open_clip = import_open_clip()
    for name in ARCHS:
        if name not in open_clip.list_models():
            open_clip.add_model_config(folder / f"{name}.json")


def _centroid_head(clip: Any, imagenet: Path, num_classes: int) -> Any:
    """[C, D]: the normalised mean image feature of each class of ``imagenet/train`` (a nearest-centroid head), so
    the stand-in models score above chance and differ from one another, as fine-tunes do."""
    import torch  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from soupkit.zoo.clip import preprocess_config  # noqa: PLC0415
    from soupkit.zoo.realdata import clip_transform  # noqa: PLC0415

    transform = clip_transform(preprocess_config(clip))
    folders = sorted(p for p in (imagenet / "train").iterdir() if p.is_dir())
    if len(folders) != num_classes:
        raise ValueError(f"{imagenet / 'train'}: {len(folders)} class folders, {num_classes} expected")
    rows = []
    with torch.no_grad():
        for folder in folders:
            images = torch.stack([transform(Image.open(f).convert("RGB")) for f in sorted(folder.iterdir())])
            rows.append(torch.nn.functional.normalize(clip.visual(images), dim=-1).mean(0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def write_model_soups_release(folder: Path, num_models: int, imagenet: Path, num_classes: int = len(WNIDS),
                              seed: int = SEED) -> dict[str, str]:
    """``model_{i}.pt`` (i < num_models) in the layout model-soups saves and ``checksums.json``; returns
    ``{file name: sha256}``. Their start point goes to :data:`ZEROSHOT_NAME` beside them (not part of the
    release, as model-soups ships none: it stands in for ``python -m soupkit.zoo.zeroshot``'s file).

    Every model is one random CLIP image tower (the text transformer deleted, as ``ModelWrapper`` does, which
    leaves six text tensors) with a nearest-centroid head on ``imagenet``, plus a seeded perturbation growing with
    ``i``: fine-tunes of one start point that are not all equally good.
    """
    import torch  # noqa: PLC0415

    from soupkit.zoo.clip import create_clip  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    clip = create_clip(VIT_B32).eval()
    head = 20.0 * _centroid_head(clip, imagenet, num_classes)  # x 20: logits of a trained head's scale
    del clip.transformer
    base = {f"model.{k}": v.detach().clone() for k, v in clip.state_dict().items()}
    base["classification_head.weight"] = head
    base["classification_head.bias"] = torch.zeros(num_classes)
    save_state_dict(base, folder / ZEROSHOT_NAME, metadata={"kind": "zero-shot stand-in"})
    checksums = {}
    for i in range(num_models):
        noise = torch.Generator().manual_seed(seed * 1000 + i + 1)
        scale = 0.05 * (1 + i)
        state = {k: v + scale * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=noise)
                 if v.is_floating_point() and v.numel() > 1 else v.clone() for k, v in base.items()}
        path = folder / f"model_{i}.pt"
        torch.save(state, path)
        checksums[path.name] = sha256_file(path)
    atomic_write_json(folder / CHECKSUMS_NAME, checksums)
    return checksums


def _jpeg(image: Any, path: Path) -> None:
    image.save(path, format="JPEG", quality=90)


def write_imagenet(root: Path, train_per_class: int, val_per_class: int, seed: int = SEED) -> Path:
    """``root/train/<wnid>/<wnid>_<n>.JPEG`` and ``root/val/<wnid>/ILSVRC2012_val_<n>.JPEG`` for :data:`WNIDS`
    (varied sizes, a class-dependent tint so the classes differ), and ``root/../imagenet_98_idxs.npy``."""
    from PIL import Image  # noqa: PLC0415

    if train_per_class <= HELDOUT_PER_CLASS:
        raise ValueError(f"train_per_class must exceed the {HELDOUT_PER_CLASS} held-out images per class")
    rng = np.random.default_rng(seed)
    val_index = 0
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            tint = np.array([(37 * c) % 256, (91 * c) % 256, (153 * c) % 256], dtype=np.int16)
            for j in range(count):
                h, w = (int(v) for v in rng.integers(40, 90, 2))
                pixels = (rng.integers(0, 128, (h, w, 3)) + tint // 2).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if split == "train" and j == 0 and c in (1, 2):  # ImageNet holds greyscale and CMYK JPEGs
                    image = image.convert("L" if c == 1 else "CMYK")
                if split == "train":
                    name = f"{wnid}_{1000 + j}.JPEG"
                else:
                    val_index += 1
                    name = f"ILSVRC2012_val_{val_index:08d}.JPEG"
                _jpeg(image, folder / name)
    # model-soups' mask: float 0/1 per image of ImageFolder(train), 1 = held out, 26 per class
    mask = np.zeros(len(WNIDS) * train_per_class)
    for c in range(len(WNIDS)):
        mask[c * train_per_class + rng.permutation(train_per_class)[:HELDOUT_PER_CLASS]] = 1.0
    np.save(root.parent / MASK_NAME, mask)
    return root


def _standin_pixels(rng: np.random.Generator, c: int) -> np.ndarray:
    """uint8 [h, w, 3] of a varied size with class ``c``'s tint (write_imagenet's), so the stand-in models, whose
    heads are class centroids of those tints, score above chance on the shifts too."""
    tint = np.array([(37 * c) % 256, (91 * c) % 256, (153 * c) % 256], dtype=np.int16)
    h, w = (int(v) for v in rng.integers(40, 90, 2))
    return (rng.integers(0, 128, (h, w, 3)) + tint // 2).clip(0, 255).astype(np.uint8)


def _objectnet_mappings(folder: Path) -> None:
    """ObjectNet's four ``mappings/`` files for :data:`OBJECTNET_CLASSES` over the stand-in's ImageNet classes, with
    their real shapes: ImageNet names (``"a; b"``) -> lines of ``imagenet_to_label_2012_v2`` (ILSVRC-2012 ids, not
    the sorted-wnid order) -> PyTorch indices through ``pytorch_to_imagenet_2012_id.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    line_of = {p: (7 * p + 3) % len(WNIDS) for p in range(len(WNIDS))}  # a permutation: the reader must follow it
    lines = [""] * len(WNIDS)
    for p, line in line_of.items():
        lines[line] = IMAGENET_NAMES[p]
    (folder / "imagenet_to_label_2012_v2").write_text("".join(f"{name}\n" for name in lines))
    (folder / "pytorch_to_imagenet_2012_id.json").write_text(
        json.dumps({str(p): line for p, line in line_of.items()}) + "\n")
    (folder / "folder_to_objectnet_label.json").write_text(
        json.dumps({f: label for f, (label, _) in OBJECTNET_CLASSES.items()}, indent=1) + "\n")
    (folder / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {label: "; ".join(IMAGENET_NAMES[i] for i in ids) for label, ids in OBJECTNET_CLASSES.values() if ids},
        indent=1) + "\n")


def write_shifts(root: Path, per_class: int = SHIFT_PER_CLASS, seed: int = SEED) -> Path:
    """The five shifts of ``soupkit.zoo.shifts`` under ``root`` in their released layouts (see the module's docstring),
    ``per_class`` images per class; the same bytes on every run."""
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng([seed, 1])  # not write_imagenet's draws: other images of the same classes

    def name(*parts: object) -> str:  # V2 and ObjectNet files are named by hashes
        return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()

    def jpegs(folder: Path, c: int, file_name: Callable[[int], str], mode: str = "RGB") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            _jpeg(Image.fromarray(_standin_pixels(rng, c)).convert(mode), folder / file_name(j))

    for c in range(len(WNIDS)):  # ImageNet-V2: folders named by class index
        jpegs(root / "imagenetv2-matched-frequency-format-val" / str(c), c, lambda j: f"{name('v2', c, j)}.jpeg")
    styles = ("art", "cartoon", "painting", "sculpture", "toy")
    for c in IMAGENET_R_CLASSES:
        jpegs(root / "imagenet-r" / WNIDS[c], c, lambda j: f"{styles[j % len(styles)]}_{j}.jpg")
    for c in IMAGENET_A_CLASSES:
        jpegs(root / "imagenet-a" / WNIDS[c], c, lambda j: f"{j:06d}_{WNIDS[c]}.jpg")
    for c in range(len(WNIDS)):  # sketches are drawings in black and white
        jpegs(root / "sketch" / WNIDS[c], c, lambda j: f"sketch_{j}.JPEG", mode="L")
    objectnet = root / "objectnet-1.0"
    for folder, (_, ids) in OBJECTNET_CLASSES.items():
        (objectnet / "images" / folder).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            pixels = _standin_pixels(rng, ids[0] if ids else 0)
            pixels[[0, -1], :] = pixels[:, [0, -1]] = (255, 0, 0)  # the released images' 1-pixel red frame
            Image.fromarray(pixels).save(objectnet / "images" / folder / f"{name('objectnet', folder, j)}.png",
                                         format="PNG")
    _objectnet_mappings(objectnet / "mappings")
    return root


class _Py2Str(bytes):
    """Bytes that pickle as a Python 2 ``str``, as in the published CIFAR files (read back as text under latin1)."""


class _Global:
    """A class path written as is (the published files name numpy 1.x's ``numpy.core.multiarray``)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self) -> None:  # pickle's reduce asks for a callable
        raise TypeError("a pickling marker, not a function")


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can take new types
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj: _Py2Str) -> None:
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    def save_marker(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2str
    dispatch[_Global] = save_marker

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):  # numpy 1.x's reduce of a uint8 array, its bytes a Python 2 str
            dtype = (_Global("numpy", "dtype"), (_Py2Str(b"u1"), 0, 1), (3, _Py2Str(b"|"), None, None, None, -1, -1, 0))
            empty = (_Global("numpy", "ndarray"), (0,), _Py2Str(b"b"))
            return (_Global("numpy.core.multiarray", "_reconstruct"), empty,
                    (1, obj.shape, _DtypeState(dtype), False, _Py2Str(np.ascontiguousarray(obj).tobytes())))
        if isinstance(obj, _DtypeState):
            return obj.reduced
        return NotImplemented


class _DtypeState:
    """A dtype as numpy 1.x pickles it: ``numpy.dtype('u1', 0, 1)`` and its state tuple."""

    def __init__(self, reduced: tuple) -> None:
        self.reduced = reduced


def _py2(value: Any) -> Any:
    """Keys and strings of a CIFAR entry as Python 2 ``str``, recursively."""
    if isinstance(value, str):
        return _Py2Str(value.encode("latin1"))
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def _dump_py2(entry: Mapping[str, Any], path: Path) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(_py2(dict(entry)))
    path.write_bytes(buffer.getvalue())


def write_cifar(root: Path, train: int, test: int, seed: int = SEED) -> Path:
    """``root/cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta) and ``root/cifar-100-python``
    (train, test, meta) with the published files' keys (``data`` uint8 [N, 3072] of CHW planes, ``labels`` /
    ``fine_labels`` + ``coarse_labels``, ``filenames``, ``batch_label``)."""
    rng = np.random.default_rng(seed)

    def images(n: int, labels: np.ndarray, classes: int) -> np.ndarray:
        # a class-dependent mean so the stand-ins are not pure noise
        base = rng.integers(0, 160, (n, 3, 32, 32))
        return (base + (labels * (96 // max(1, classes // 10)) % 96)[:, None, None, None]).astype(np.uint8)

    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, 10, train + test)
    data = images(train + test, labels, 10).reshape(train + test, -1)
    parts = np.array_split(np.arange(train), 5)
    for b, idx in enumerate(parts, 1):
        _dump_py2({"batch_label": f"training batch {b} of 5", "labels": [int(v) for v in labels[idx]],
                   "data": data[idx], "filenames": [f"standin_s_{i:06d}.png" for i in idx]}, c10 / f"data_batch_{b}")
    idx = np.arange(train, train + test)
    _dump_py2({"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in labels[idx]], "data": data[idx],
               "filenames": [f"standin_t_{i:06d}.png" for i in idx]}, c10 / "test_batch")
    _dump_py2({"num_cases_per_batch": int(len(parts[0])), "label_names": list(CIFAR10_CLASSES), "num_vis": 3072},
              c10 / "batches.meta")

    c100 = root / "cifar-100-python"
    c100.mkdir(parents=True, exist_ok=True)
    fine = rng.integers(0, 100, train + test)
    data = images(train + test, fine, 100).reshape(train + test, -1)
    for name, idx in (("train", np.arange(train)), ("test", np.arange(train, train + test))):
        _dump_py2({"filenames": [f"standin_{i:06d}.png" for i in idx], "batch_label": f"{name}ing batch 1 of 1",
                   "fine_labels": [int(v) for v in fine[idx]], "coarse_labels": [int(v) // 5 for v in fine[idx]],
                   "data": data[idx]}, c100 / name)
    _dump_py2({"fine_label_names": [f"fine_{i:02d}" for i in range(100)],
               "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]}, c100 / "meta")
    return root


def write_sweeps(zoos: Path, cifar: Path, configs: Path, models: int, steps: int) -> dict[str, Path]:
    """The three sweep folders of presets/paper.yaml, each made by ``python -m soupkit.zoo.sweep`` (in process):
    ``models`` fine-tunes of ``steps`` optimizer steps from a random start (no pretrained weights offline)."""
    from soupkit.zoo import sweep  # noqa: PLC0415

    made = {}
    for name, arch, dataset in (("vitl14_cifar10", VIT_L14, "cifar10"), ("vitl14_cifar100", VIT_L14, "cifar100"),
                                ("rn101_cifar100", RN101, "cifar100")):
        out = zoos / name
        sweep.main(["--arch", arch, "--dataset", dataset, "--root", str(cifar), "--out", str(out), "--k", str(models),
                    "--model-config", str(configs / f"{arch}.json"), "--epochs", "1", "--batch-size", "32",
                    "--max-steps", str(steps), "--warmup-steps", "1", "--lr-min", "1e-4", "--lr-max", "1e-3",
                    "--device", "cpu", "--num-workers", "0", "--seed", str(SEED), "--no-progress"])
        made[name] = out
    return made


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # the download's own lines say what happened
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 at an ephemeral port while the block runs; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def download_release(release: Path, dest: Path, num_models: int) -> None:
    """``python -m soupkit.zoo.hub`` (a subprocess, as a user runs it) from a local server of ``release``,
    checking every file against ``release/checksums.json``."""
    with serve(release) as url:
        subprocess.run([sys.executable, "-m", "soupkit.zoo.hub", "--out", str(dest), "--num-models", str(num_models),
                        "--base-url", url, "--expect", str(release / CHECKSUMS_NAME), "--retries", "1",
                        "--no-progress"], check=True)


def make_inputs(out: Path, sizes: Sizes | None = None) -> dict[str, Path]:
    """Write every stand-in under ``out`` (see the module's docstring) and download the checkpoints; returns the
    folders. A folder finished before (its ``done.json`` records the sizes) is kept."""
    sizes = sizes or Sizes()
    out.mkdir(parents=True, exist_ok=True)
    configs = write_configs(out / "configs")
    _register(configs)
    paths = {"configs": configs, "release": out / "release", "checkpoints": out / "checkpoints" / "model-soups",
             "imagenet": out / "imagenet", "cifar": out / "cifar", "zoos": out / "zoos", "shifts": out / "shifts"}
    stamp = out / "done.json"
    wanted = {"version": 3, "sizes": asdict(sizes), "archs": ARCHS, "seed": SEED}  # version: of this writer
    done = json.loads(stamp.read_text()) if stamp.is_file() else None
    if done != json.loads(json.dumps(wanted)):
        if done is not None:
            raise FileExistsError(f"{out} holds stand-ins of other sizes ({stamp}); delete the folder")
        write_imagenet(paths["imagenet"], sizes.train_per_class, sizes.val_per_class)
        write_model_soups_release(paths["release"], sizes.num_models, paths["imagenet"])
        write_cifar(paths["cifar"], sizes.cifar_train, sizes.cifar_test)
        write_sweeps(paths["zoos"], paths["cifar"], configs, sizes.sweep_models, sizes.sweep_steps)
        atomic_write_json(stamp, wanted)
    # the shifts have their own stamp: inputs written before they existed are completed, not refused
    shift_stamp = paths["shifts"] / "done.json"
    shifts_wanted = {"version": 1, "per_class": SHIFT_PER_CLASS, "seed": SEED}
    shifts_done = json.loads(shift_stamp.read_text()) if shift_stamp.is_file() else None
    if shifts_done != shifts_wanted:
        if shifts_done is not None:
            raise FileExistsError(f"{paths['shifts']} holds stand-in shifts of another version ({shift_stamp}); "
                                  "delete the folder")
        write_shifts(paths["shifts"])
        atomic_write_json(shift_stamp, shifts_wanted)
    # every run downloads again into an empty folder: the hub's path is part of what the rehearsal checks
    for path in sorted(paths["checkpoints"].glob("*")) if paths["checkpoints"].is_dir() else []:
        path.unlink()
    download_release(paths["release"], paths["checkpoints"], sizes.num_models)
    # the user's own step after the download (presets/README.md, section 1): θ_0 beside the checkpoints
    shutil.copyfile(paths["release"] / ZEROSHOT_NAME, paths["checkpoints"] / ZEROSHOT_NAME)
    return paths


def setup(out_dir: str | os.PathLike) -> dict[str, str]:
    """The runner's ``setup`` hook of presets/rehearsal.yaml: the stand-ins under ``<out_dir>/inputs``; returns
    the environment the notebooks' kernels need (the stand-in architectures' configs)."""
    from soupkit.runtime._compat import MODEL_CONFIGS_ENV  # noqa: PLC0415

    paths = make_inputs(Path(out_dir) / "inputs")
    return {MODEL_CONFIGS_ENV: str(paths["configs"].resolve())}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m soupkit.experiments.rehearsal --out DIR``: write the stand-ins and download the checkpoints."""
    parser = argparse.ArgumentParser(prog="python -m soupkit.experiments.rehearsal",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the stand-ins (e.g. outputs/rehearsal/inputs)")
    for name, value in asdict(Sizes()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    args = vars(parser.parse_args(argv))
    out = Path(args.pop("out"))
    paths = make_inputs(out, Sizes(**args))
    from soupkit.runtime._compat import MODEL_CONFIGS_ENV  # noqa: PLC0415

    print(f"stand-ins in {out}; run notebooks with {MODEL_CONFIGS_ENV}={paths['configs'].resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
