"""Where a zoo comes from: the embedded one (``soupkit.zoo``), model-soups' released checkpoints, or a
``soupkit.zoo.sweep`` folder -- behind the one interface the experiments use (``paths``, ``records``,
``make_model()``, ``loaders(...)``, ``shift_loader(...)``), so every notebook runs at paper scale by changing
parameters only.

``prepare_zoo(out_dir, source, ...)`` is what notebook 01 calls:

- ``"embedded"``: build (or resume) the small zoo of ``soupkit.zoo`` in ``out_dir``;
- ``"model-soups"`` / ``"sweep"``: write ``out_dir/source.json`` naming the checkpoints and the data set,
  then evaluate every model on the held-out and test sets, one line per model in ``out_dir/models.jsonl``
  (resumable: a line counts while its checkpoint keeps its size and modification time). Greedy soups and
  the top-n study need each model's held-out accuracy, as model-soups computes it first.

``open_zoo(out_dir)`` reads either kind back.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from soupkit.config import MAIN_TABLE_SETTINGS
from soupkit.engine.batches import make_loader
from soupkit.errors import DataError, MissingInputError, ParameterError, ResumeError
from soupkit.io import atomic_write_json, atomic_write_text
from soupkit.zoo.base import BaseZoo
from soupkit.zoo.shifts import ShiftInfo, available_shifts, imagenet_wnids, read_shift

__all__ = ["SOURCES", "SourceSpec", "ExternalZoo", "prepare_zoo", "open_zoo"]

SOURCES = ("embedded", "model-soups", "sweep")
SOURCE_FILE = "source.json"
RECORDS_FILE = "models.jsonl"
_NUM_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100}


@dataclass(frozen=True)
class SourceSpec:
    """A zoo made elsewhere and its data set (paths absolute once written to ``source.json``).

    Attributes:
        kind: ``"model-soups"`` (``checkpoint_dir/model_{i}.pt``, i < num_models; converted ``.safetensors``
            of the same stem are used when present) or ``"sweep"`` (the models of a ``soupkit.zoo.sweep`` folder,
            in index order).
        dataset: ``imagenet`` (ImageFolder ``train/`` + ``val/``), ``cifar10`` or ``cifar100``
            (torchvision's files); held-out split as ``soupkit.zoo.realdata.dataset_splits`` (26 per class / 10 %).
        split_file: the held-out split JSON (a sweep's is ``checkpoint_dir/split.json``: use it).
        pretrained: the checkpoint the fine-tunes started from (θ_0, in their format), for Model Stock and
            task arithmetic; "" (default): not known.
        shift_root: ImageNet only: the folder holding the distribution-shift test sets in their released layouts
            (``soupkit.zoo.shifts``: ImageNet-V2, -R, -Sketch, -A, ObjectNet; those present are used); None: no
            shifts. Not part of the zoo's identity: it can be set or moved without evaluating the models again.
    """

    kind: str
    checkpoint_dir: str
    num_models: int
    dataset: str
    data_root: str
    split_file: str
    arch: str = "ViT-B-32-quickgelu"
    num_classes: int | None = None
    seed: int = 0
    workers: int = 4
    pretrained: str = ""
    shift_root: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCES[1:]:
            raise ParameterError(f"source kind must be one of {SOURCES[1:]}, got {self.kind!r}")
        if self.dataset not in _NUM_CLASSES:
            raise ParameterError(f"dataset must be one of {sorted(_NUM_CLASSES)}, got {self.dataset!r}")
        if self.num_models < 1:
            raise ParameterError(f"num_models must be >= 1, got {self.num_models}")
        if self.shift_root is not None and self.dataset != "imagenet":
            raise ParameterError("shift_root holds ImageNet's shifted test sets; the zoo's data set is "
                                 f"{self.dataset!r}")

    @property
    def classes(self) -> int:
        return self.num_classes or _NUM_CLASSES[self.dataset]

    def checkpoint_paths(self) -> list[Path]:
        """The checkpoints, in zoo order; raises FileNotFoundError naming what is missing."""
        folder = Path(self.checkpoint_dir)
        if self.kind == "model-soups":
            paths = []
            for i in range(self.num_models):
                pt, st = folder / f"model_{i}.pt", folder / f"model_{i}.safetensors"
                paths.append(st if st.is_file() else pt)
            missing = [p.name for p in paths if not p.is_file()]
            if missing:
                raise MissingInputError(f"{folder}: {len(missing)} checkpoint(s) missing ({', '.join(missing[:3])}"
                                       f"...); download them with `python -m soupkit.zoo.hub --out {folder}`")
            return paths
        lines = (folder / "models.jsonl").read_text().splitlines() if (folder / "models.jsonl").is_file() else []
        records = sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["index"])
        if len(records) < self.num_models:
            raise MissingInputError(f"{folder}: the sweep has {len(records)} finished models, {self.num_models} "
                                   "asked; run `python -m soupkit.zoo.sweep` further or lower num_models")
        return [folder / r["file"] for r in records[: self.num_models]]


@lru_cache(maxsize=4)
def _data(spec: SourceSpec, keep_text: bool) -> Any:
    from soupkit.zoo import realdata  # noqa: PLC0415  (torchvision, open_clip: only for real data)
    from soupkit.zoo.clip import build_model_soups_model, preprocess_config  # noqa: PLC0415

    transform = realdata.clip_transform(preprocess_config(build_model_soups_model(
        spec.classes, spec.arch, keep_text_leftovers=keep_text)))
    data = realdata.dataset_splits(spec.dataset, spec.data_root, transform, spec.split_file, seed=spec.seed)
    if len(data.classes) != spec.classes:  # else labels and logits would disagree without an error
        raise DataError(f"{spec.data_root}: {len(data.classes)} classes, but the zoo's heads have {spec.classes} "
                        "outputs; point data_root at the data set the checkpoints were fine-tuned on")
    return data


@lru_cache(maxsize=2)
def _eval_transform(spec: SourceSpec, keep_text: bool) -> Any:
    # once per zoo, not per shift: it builds the classifier to read its preprocessing
    from soupkit.zoo import realdata  # noqa: PLC0415  (torchvision, open_clip: only for real data)
    from soupkit.zoo.clip import build_model_soups_model, preprocess_config  # noqa: PLC0415

    return realdata.clip_transform(preprocess_config(build_model_soups_model(
        spec.classes, spec.arch, keep_text_leftovers=keep_text)))


@lru_cache(maxsize=8)
def _shift_data(spec: SourceSpec, keep_text: bool, name: str) -> Any:
    transform = _eval_transform(spec, keep_text)
    # the heads' classes are ImageFolder's sorted train folders: the wnid -> index map of ImageNet-R/-A/-Sketch
    wnids = imagenet_wnids(Path(spec.data_root) / "train")
    if len(wnids) != spec.classes:
        raise DataError(f"{spec.data_root}/train: {len(wnids)} classes, but the zoo's heads have {spec.classes} "
                        "outputs")
    return read_shift(name, spec.shift_root, wnids, transform)


@dataclass(frozen=True)
class ExternalZoo(BaseZoo):
    """A zoo of ``SourceSpec`` with its per-model records (``heldout_acc``, ``test_acc``, ``finetune_seconds``)."""

    out_dir: Path
    spec: SourceSpec
    records: tuple[dict[str, Any], ...]

    @property
    def paths(self) -> list[Path]:
        return [Path(r["path"]) for r in self.records]

    @property
    def pretrained_path(self) -> Path | None:
        """``SourceSpec.pretrained`` where it was given (``prepare_zoo(..., pretrained=...)``), else None."""
        return Path(self.spec.pretrained) if self.spec.pretrained else None

    @cached_property
    def _keeps_text(self) -> bool:
        # read once per zoo: make_model, loaders and tensors all need it, and it opens a checkpoint
        from soupkit.zoo.clip import TEXT_LEFTOVER_KEYS  # noqa: PLC0415
        from soupkit.pool.checkpoint_pool import CheckpointPool  # noqa: PLC0415

        return any(k in CheckpointPool(self.paths[:1]).spec for k in TEXT_LEFTOVER_KEYS)

    def make_model(self) -> nn.Module:
        """The classifier whose ``state_dict`` keys are those of the checkpoints (random weights)."""
        from soupkit.zoo.clip import build_model_soups_model  # noqa: PLC0415

        return build_model_soups_model(self.spec.classes, self.spec.arch, keep_text_leftovers=self._keeps_text)

    def tensors(self, split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, 3, H, W], y [n] of a seeded subset of ``split`` (``finetune``, ``heldout`` or ``test``), stacked in
        memory: for small n only (e.g. re-estimating BatchNorm statistics)."""
        data = _data(self.spec, self._keeps_text)
        dataset = {"finetune": data.train, "heldout": data.heldout, "test": data.test}[split]
        order = np.random.default_rng(self.spec.seed).permutation(len(dataset))[: n or len(dataset)]
        items = [dataset[int(i)] for i in order]
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])

    def describe(self) -> str:
        return f"{self.spec.kind} zoo: {len(self.records)} {self.spec.arch} fine-tunes on {self.spec.dataset}"

    def shift_names(self) -> tuple[str, ...]:
        """The shifts of ``soupkit.zoo.shifts.PAPER_SHIFTS`` found under ``spec.shift_root`` (none without one)."""
        return () if self.spec.shift_root is None else available_shifts(self.spec.shift_root)

    def shift_info(self, name: str) -> ShiftInfo:
        """``soupkit.zoo.shifts.ShiftInfo`` of shift ``name`` (its class subset or ObjectNet's groups)."""
        self._check_shift(name)
        return _shift_data(self.spec, self._keeps_text, name).info

    def shift_loader(self, name: str, eval_batch_size: int = 500) -> DataLoader:
        """Shift ``name``'s images (the zoo's eval transform) and labels (see :meth:`shift_info`), fixed order."""
        self._check_shift(name)
        return make_loader(_shift_data(self.spec, self._keeps_text, name), eval_batch_size,
                           num_workers=self.spec.workers)

    def loaders(self, heldout_size: int | None = None, batch_size: int = MAIN_TABLE_SETTINGS["batch_size"],
                eval_batch_size: int = MAIN_TABLE_SETTINGS["eval_batch_size"],
                select_fraction: float = MAIN_TABLE_SETTINGS["select_fraction"],
                seed: int = 0) -> dict[str, DataLoader | None]:
        """See :meth:`BaseZoo.loaders`; ``heldout_size`` takes a fixed seeded subset (nested in n)."""
        data = _data(self.spec, self._keeps_text)
        order = np.random.default_rng(self.spec.seed).permutation(len(data.heldout))
        order = order[: heldout_size or len(order)]
        n_select = int(round(select_fraction * len(order)))
        learn, select = order[: len(order) - n_select], order[len(order) - n_select:]
        w = self.spec.workers
        return {
            "learn": make_loader(Subset(data.heldout, learn.tolist()), batch_size, shuffle=True, seed=seed, num_workers=w),
            "select": make_loader(Subset(data.heldout, select.tolist()), eval_batch_size, num_workers=w) if n_select else None,
            "heldout": make_loader(Subset(data.heldout, order.tolist()), eval_batch_size, num_workers=w),
            "test": make_loader(data.test, eval_batch_size, num_workers=w),
        }


def _identity_of(spec: dict[str, Any]) -> dict[str, Any]:
    """What makes two ``source.json`` the same zoo: every field (a field a file predates at its default) but the
    shift root and θ_0, which change no model's record (either can be given or moved later)."""
    defaults = {f.name: f.default for f in fields(SourceSpec) if f.default is not MISSING}
    return {k: v for k, v in {**defaults, **spec}.items() if k not in ("shift_root", "pretrained")}


def _identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _register(out: Path, spec: SourceSpec, device: str, eval_batch_size: int, progress: bool) -> ExternalZoo:
    from soupkit.methods.result import evaluate  # noqa: PLC0415
    from soupkit.pool.checkpoint_pool import CheckpointPool  # noqa: PLC0415

    old = _read(out / SOURCE_FILE)
    if old is not None and _identity_of(old) != _identity_of(json.loads(json.dumps(asdict(spec)))):
        raise ResumeError(f"{out / SOURCE_FILE} describes another zoo ({old}); use another folder")
    atomic_write_json(out / SOURCE_FILE, asdict(spec))
    paths = spec.checkpoint_paths()
    known = {r["index"]: r for r in _records(out)}
    sweep = {}
    if spec.kind == "sweep":  # the sweep measured its fine-tuning time and held-out accuracy
        lines = (Path(spec.checkpoint_dir) / "models.jsonl").read_text().splitlines()
        sweep = {Path(spec.checkpoint_dir, r["file"]): r for r in map(json.loads, filter(str.strip, lines))}
    zoo = ExternalZoo(out, spec, tuple({"index": i, **_identity(p)} for i, p in enumerate(paths)))
    todo = [i for i, p in enumerate(paths)
            if known.get(i, {}).get("path") != str(p) or any(known[i].get(k) != v for k, v in _identity(p).items())]
    if todo:
        model, loaders = zoo.make_model(), zoo.loaders(eval_batch_size=eval_batch_size)
        pool = CheckpointPool(paths)
        for i in tqdm(todo, desc="evaluating the zoo's models", disable=not progress):
            state = pool.load(i)
            known[i] = {"index": i, **_identity(paths[i]), "file": paths[i].name,
                        "heldout_acc": evaluate(model, state, loaders["heldout"], device),
                        "test_acc": evaluate(model, state, loaders["test"], device),
                        "finetune_seconds": sweep.get(paths[i], {}).get("finetune_seconds"),
                        "hparams": sweep.get(paths[i], {}).get("hparams", {})}
            atomic_write_text(out / RECORDS_FILE, "".join(json.dumps(known[j]) + "\n" for j in sorted(known)))
    return open_zoo(out)


def _head_rows(path: Path) -> int:
    """Outputs of the classification head of checkpoint ``path`` (read from its tensor specs, not its values)."""
    from soupkit.pool.checkpoint_pool import CheckpointPool  # noqa: PLC0415

    spec = CheckpointPool([path]).spec
    if "classification_head.weight" not in spec:
        raise ValueError(f"{path}: no 'classification_head.weight'; is this a model-soups classifier checkpoint?")
    return int(spec["classification_head.weight"].shape[0])


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _records(out: Path) -> list[dict[str, Any]]:
    path = out / RECORDS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def prepare_zoo(out_dir: str | os.PathLike, source: str = "embedded", *, num_models: int = 32, device: str = "cpu",
                progress: bool = True, threads: int | None = 1, search_seed: int = 0, checkpoint_dir: str = "",
                dataset: str = "imagenet", data_root: str = "", split_file: str = "", arch: str = "ViT-B-32-quickgelu",
                num_classes: int | None = None, workers: int = 4, eval_batch_size: int = 256,
                pretrained: str = "", shift_root: str = "") -> Any:
    """Build the embedded zoo, or register and evaluate a zoo made elsewhere, in ``out_dir``; returns it.

    Args:
        source: ``"embedded"`` (``soupkit.zoo.build_zoo`` with K = num_models; ``threads``, ``search_seed``)
            or ``"model-soups"`` / ``"sweep"`` (a :class:`SourceSpec` from the remaining arguments; paths are
            made absolute).
        pretrained: model-soups / sweep: the checkpoint the fine-tunes started from (θ_0); Model Stock and task
            arithmetic need it. "" = a sweep's own start point (``checkpoint_dir/init.safetensors``) where it
            exists, else none. model-soups releases none: ``python -m soupkit.zoo.zeroshot`` writes CLIP's
            zero-shot classifier, their fine-tunes' start. The embedded zoo has its own (``backbone.safetensors``).
        shift_root: ImageNet's shifted test sets (``SourceSpec.shift_root``; "" = none). The embedded zoo
            always has its own shifts (``soupkit.zoo.embedded_data.SHIFTS``) and ignores it.
    """
    if source not in SOURCES:
        raise ParameterError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "embedded":
        from soupkit.zoo.config import ZooConfig
        from soupkit.zoo.build import build_zoo  # noqa: PLC0415

        return build_zoo(out_dir, ZooConfig(k=num_models, search_seed=search_seed), progress=progress,
                         device=device, num_threads=threads)
    missing = [name for name, value in (("checkpoint_dir", checkpoint_dir), ("data_root", data_root)) if not value]
    if missing:
        raise ParameterError(f"source {source!r} needs {' and '.join(missing)}")
    split = split_file or (str(Path(checkpoint_dir) / "split.json") if source == "sweep" else "")
    if not split:
        raise ParameterError("source 'model-soups' needs split_file (where the held-out split is written and re-read)")
    from soupkit.zoo.sweep import INIT_NAME  # noqa: PLC0415 (the sweep's trainer is not needed to read a zoo)

    if not pretrained and source == "sweep" and (Path(checkpoint_dir) / INIT_NAME).is_file():
        pretrained = str(Path(checkpoint_dir) / INIT_NAME)
    if pretrained and not Path(pretrained).is_file():
        hint = (f"; write CLIP's zero-shot classifier there with `python -m soupkit.zoo.zeroshot --arch {arch} "
                f"--pretrained openai --out {pretrained}`" if source == "model-soups" else "")
        raise MissingInputError(f"pretrained={pretrained!r}: no such file (θ_0, the checkpoint the fine-tunes "
                                f"started from){hint}; or pass pretrained=\"\" (Model Stock and task arithmetic "
                                "then report 'no pretrained model')")
    spec = SourceSpec(source, str(Path(checkpoint_dir).resolve()), num_models, dataset, str(Path(data_root).resolve()),
                      str(Path(split).resolve()), arch, num_classes, search_seed, workers,
                      str(Path(pretrained).resolve()) if pretrained else "",
                      str(Path(shift_root).resolve()) if shift_root else None)
    if num_classes is None:  # the heads say how many classes they were fine-tuned on (ImageNet: 1000)
        spec = replace(spec, num_classes=_head_rows(spec.checkpoint_paths()[0]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _register(out, spec, device, eval_batch_size, progress)


def open_zoo(out_dir: str | os.PathLike) -> BaseZoo:
    """The zoo in ``out_dir``: an embedded ``soupkit.zoo.Zoo`` or an :class:`ExternalZoo`."""
    out = Path(out_dir)
    spec = _read(out / SOURCE_FILE)
    if spec is None:
        from soupkit.zoo.build import load_zoo  # noqa: PLC0415

        return load_zoo(out)
    spec = SourceSpec(**{f.name: spec[f.name] for f in fields(SourceSpec) if f.name in spec})
    records = {r["index"]: r for r in _records(out)}
    missing = [i for i in range(spec.num_models) if i not in records]
    if missing:
        raise MissingInputError(f"{out}: models {missing[:5]}... not evaluated yet; "
                                "run prepare_zoo (notebook 01) again")
    return ExternalZoo(out, spec, tuple(records[i] for i in range(spec.num_models)))


