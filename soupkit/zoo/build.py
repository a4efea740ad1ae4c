"""A small model zoo built with the model-soups recipe: one pre-trained backbone, one shared linear
probe (LP), then K fine-tunes of all parameters (LP-FT) from a seeded random hyper-parameter search.

Files in ``out_dir``:

- ``zoo.json``: the ZooConfig, the split file's fingerprint, the backbone's sha256 and LP accuracies;
- ``backbone.safetensors``: pre-trained backbone + LP head (the common start of every fine-tune);
- ``model_{i:03d}.safetensors``: fine-tune i (state dict of ``models.ViTClassifier``);
- ``models.jsonl``: one JSON line per fine-tune (index, file, sha256, hparams, heldout_acc, test_acc,
  finetune_seconds);
- ``<split_name>_seed<s>.json``: only with ``ZooConfig.split_seed = s``, the zoo's own split file (same format
  as the committed ``soupkit/zoo/splits`` files, drawn with ``data.make_splits``).

Resuming: a model counts as built only if its line in ``models.jsonl`` exists and the file's sha256
matches it; anything else is retrained. Model i's hyper-parameters depend only on (search_seed, i),
so changing only ``k`` extends or truncates the zoo without retraining. Any other config change, or a
different split file, is refused (``ZooMismatchError``) unless ``overwrite=True``, which deletes the
zoo's files and rebuilds: silently mixing models from two recipes would corrupt every soup built on them.

Every file is written to a temporary name and moved into place with ``os.replace`` (``zoo_files``), so an
interrupted build never leaves a half-written file under a name that is read. Same config, same thread count
and CPU -> byte-identical checkpoints (timings in models.jsonl differ). The recipe itself (data, training
loop, pre-training + probe) is ``soupkit.zoo.recipe``.

Variants: ``ZooConfig.model`` is a ``ViTConfig`` of any size or a ``ResNetConfig`` (open_clip's BatchNorm
ResNet), ``ZooConfig.task`` one of ``soupkit.zoo.embedded_data.TASKS``. Zoos of several tasks with the same pre-training
can share one backbone (``build_zoo(..., pretrained_from=...)``), as CLIP's fine-tunes on CIFAR-10 and
CIFAR-100 do. A zoo.json written before a key was added to ZooConfig reads that key as its default.

Measured with the defaults (K = 32, 1 thread, 2 000 fine-tune / 4 000 held-out / 2 000 test images):
linear probe 0.787 test; fine-tunes 0.797 / 0.822 / 0.855 test (min / mean / max); uniform soup 0.840;
greedy soup 2 ingredients, 0.862. 350 CPU-seconds in all: ~60 % fine-tuning, ~28 % pre-training, the rest evaluation.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from soupkit.config import MAIN_TABLE_SETTINGS
from soupkit.engine.batches import make_loader
from soupkit.engine.evaluation import accuracy
from soupkit.errors import ZooMismatchError
from soupkit.io import atomic_write_text, sha256_file
from soupkit.runtime.progress import report
from soupkit.zoo import files
from soupkit.zoo.base import BaseZoo
from soupkit.zoo.config import ZooConfig
from soupkit.zoo.embedded_data import (DEFAULT_SPLITS_DIR, SEEN_BY_TASK, SHIFTS, TASKS, Splits, SplitSizes, load_task,
                                       read_split_file, regenerate_splits, shift_images, split_path, to_tensor)
from soupkit.zoo.embedded_models import ViTClassifier, build_classifier
from soupkit.zoo.recipe import load_train_data, logits_of, pretrain_and_probe, PRETRAIN_FIELDS
from soupkit.zoo.recipe import train as _train  # looked up here at each call: tests count fine-tunes
from soupkit.zoo.shifts import ShiftInfo

__all__ = ["FinetuneHParams", "sample_hparams", "Zoo", "build_zoo", "load_zoo", "seeded_split_name", "zoo_splits"]

FORMAT_VERSION = 1




@dataclass(frozen=True)
class FinetuneHParams:
    """One draw of the random search (seed drives data order and augmentation noise)."""

    lr: float
    weight_decay: float
    epochs: int
    label_smoothing: float
    aug_strength: float
    seed: int


def sample_hparams(config: ZooConfig, index: int) -> FinetuneHParams:
    """Hyper-parameters of fine-tune ``index``: a function of (search_seed, index) only, not of k."""
    rng = np.random.default_rng([config.search_seed, index])
    lo, hi = np.log(config.lr_range[0]), np.log(config.lr_range[1])
    return FinetuneHParams(
        lr=float(np.exp(rng.uniform(lo, hi))),
        weight_decay=float(rng.choice(config.weight_decay_choices)),
        epochs=int(rng.choice(config.epoch_choices)),
        label_smoothing=float(rng.choice(config.label_smoothing_choices)),
        aug_strength=float(rng.choice(config.aug_choices)),
        seed=int(rng.integers(2**31 - 1)),
    )


@dataclass(frozen=True)
class Zoo(BaseZoo):
    """A built zoo: ``paths[i]`` is fine-tune i's checkpoint, ``records[i]`` its models.jsonl line."""

    out_dir: Path
    config: ZooConfig
    records: tuple[dict[str, Any], ...]
    info: dict[str, Any]  # zoo.json minus the config: backbone sha, LP accuracies, pre-training time

    @property
    def paths(self) -> list[Path]:
        return [self.out_dir / r["file"] for r in self.records]

    @property
    def backbone_path(self) -> Path:
        return self.out_dir / self.info["backbone"]["file"]

    @property
    def pretrained_path(self) -> Path:
        """``backbone.safetensors``: the pretrained backbone with its linear-probe head (every fine-tune's start)."""
        return self.backbone_path

    def make_model(self) -> ViTClassifier:
        """An untrained classifier of the zoo's architecture, to ``load_state_dict`` a checkpoint into."""
        return build_classifier(self.config.model)

    def input_shape(self, model: nn.Module | None = None) -> tuple[int, int, int]:
        """``(in_channels, image_size, image_size)`` of the zoo's config (the ResNet's tower is padded larger)."""
        cfg = self.config.model
        return (cfg.in_channels, cfg.image_size, cfg.image_size)

    def summary(self) -> dict[str, Any]:
        """One row describing the zoo: architecture, parameters, task, K, linear probe and fine-tune test
        accuracy (min / mean / max, fractions)."""
        test = np.array([r["test_acc"] for r in self.records])
        return {"task": self.config.task, "arch": self._arch, "width": self.config.model.width,
                "parameters": sum(p.numel() for p in self.make_model().parameters()), "k": len(self.records),
                "lp_test_acc": self.linear_probe_accuracy, "finetune_test_min": float(test.min()),
                "finetune_test_mean": float(test.mean()), "finetune_test_max": float(test.max())}

    @property
    def linear_probe_accuracy(self) -> float:
        return self.info["backbone"]["lp_test_acc"]

    @property
    def _arch(self) -> str:
        return "ResNet" if getattr(self.config.model, "arch", "vit") == "resnet" else "ViT"

    def describe(self) -> str:
        task = self.config.task.replace("animal_mnist", "Animal-MNIST").replace("_", " ")
        return f"embedded zoo: {len(self.records)} {self._arch} fine-tunes on {task}"

    def loaders(self, heldout_size: int | None = None, batch_size: int = MAIN_TABLE_SETTINGS["batch_size"],
                eval_batch_size: int = MAIN_TABLE_SETTINGS["eval_batch_size"],
                select_fraction: float = MAIN_TABLE_SETTINGS["select_fraction"],
                seed: int = 0) -> dict[str, DataLoader | None]:
        """See :meth:`BaseZoo.loaders`; ``heldout_size`` takes a class-balanced prefix of the held-out split, the
        last ``select_fraction`` of it is the select part."""
        hx, hy = self.tensors("heldout", heldout_size)
        tx, ty = self.tensors("test", None)
        n_select = int(round(select_fraction * len(hy)))
        learn_x, learn_y = hx[: len(hy) - n_select], hy[: len(hy) - n_select]
        return {
            "learn": make_loader((learn_x, learn_y), batch_size, shuffle=True, seed=seed),
            "select": make_loader((hx[len(hy) - n_select:], hy[len(hy) - n_select:]), eval_batch_size)
            if n_select else None,
            "heldout": make_loader((hx, hy), eval_batch_size),
            "test": make_loader((tx, ty), eval_batch_size),
        }

    def shift_names(self) -> tuple[str, ...]:
        """``embedded_data.SHIFTS`` less the families the zoo's task fine-tuned on (``SEEN_BY_TASK``)."""
        seen = SEEN_BY_TASK.get(self.config.task, frozenset())
        return tuple(s for s in SHIFTS if s not in seen)

    def shift_info(self, name: str) -> ShiftInfo:
        """The test split's classes themselves: plain arg-max over the zoo's classes."""
        self._check_shift(name)
        return ShiftInfo(name, self.config.model.num_classes)

    def shift_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, C, H, W], y [n]: the whole test split (the order and labels of ``tensors("test")``) under shift
        ``name`` (``embedded_data.shift_images``)."""
        self._check_shift(name)
        splits = zoo_splits(self.out_dir, self.config)
        idx = splits.subset("test", None)
        images = shift_images(name, self.config.task, idx)
        return to_tensor(images, self.config.model.in_channels), torch.from_numpy(load_task(self.config.task)[1][idx])

    def shift_loader(self, name: str, eval_batch_size: int = 500) -> DataLoader:
        """Shift ``name`` of the test split in the test loader's order (``loaders()["test"]``): its per-image
        results pair with the in-distribution ones."""
        return make_loader(self.shift_tensors(name), eval_batch_size)

    def load_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """State dict of fine-tune ``index`` (CPU tensors)."""
        return load_file(self.paths[index])

    def tensors(self, split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images x [n, C, H, W] float32 and labels y [n] int64 of the zoo's task (CPU), for a split of the
        zoo's split file (``finetune``, ``heldout``, ``test``...); n = a class-balanced prefix, None = all."""
        splits = zoo_splits(self.out_dir, self.config)
        images, labels = load_task(self.config.task)
        idx = splits.subset(split, n)
        return to_tensor(images[idx], self.config.model.in_channels), torch.from_numpy(labels[idx])


def seeded_split_name(config: ZooConfig) -> str:
    """Name of the split file of a zoo with ``config.split_seed`` set (in its folder): ``<split_name>_seed<s>``."""
    return f"{config.split_name}_seed{config.split_seed}"


def zoo_splits(out_dir: str | Path, config: ZooConfig, splits_dir: str | Path = DEFAULT_SPLITS_DIR,
               create: bool = False) -> Splits:
    """The splits of the zoo in ``out_dir``: the committed file ``splits_dir/<split_name>.json`` when
    ``config.split_seed`` is None, else ``out_dir/<seeded_split_name>.json`` (with ``create``: written first if
    missing, with the committed file's sizes)."""
    if config.split_seed is None:
        return read_split_file(splits_dir, config.split_name)
    name = seeded_split_name(config)
    if create and not split_path(out_dir, name).is_file():
        sizes = json.loads(split_path(splits_dir, config.split_name).read_text())["sizes"]
        regenerate_splits(out_dir, name, SplitSizes(**sizes), seed=config.split_seed)
    return read_split_file(out_dir, name)


def _mismatch(info: dict[str, Any], config: ZooConfig, splits: Splits) -> list[str]:
    """Reasons the zoo on disk cannot be extended with ``config`` (k may differ)."""
    try:  # through ZooConfig, so a key the zoo.json predates compares as its default
        old_config = json.loads(json.dumps(ZooConfig.from_dict(info["config"]).to_dict()))
    except (TypeError, KeyError, ValueError) as err:
        return [f"zoo.json holds a config this version cannot read ({err})"]
    old = {k: v for k, v in old_config.items() if k != "k"}
    new = {k: v for k, v in json.loads(json.dumps(config.to_dict())).items() if k != "k"}
    why = [f"{k}: {old.get(k)!r} on disk, {new.get(k)!r} asked" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if info.get("splits_fingerprint") != splits.fingerprint:
        why.append("the split file changed")
    if info.get("format") != FORMAT_VERSION:
        why.append(f"format {info.get('format')} on disk, {FORMAT_VERSION} expected")
    return why


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------- public
def _shared_backbone(source: str | Path, config: ZooConfig) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` tensors of the zoo in ``source``, refused unless its pre-training equals ``config``'s."""
    other = load_zoo(source)
    same = {f: getattr(config, f) == getattr(other.config, f) for f in (*PRETRAIN_FIELDS, "split_seed")}
    same["model"] = dataclasses.replace(other.config.model, num_classes=0) == \
        dataclasses.replace(config.model, num_classes=0)
    if not all(same.values()):
        raise ZooMismatchError(f"{source} was pre-trained with another recipe "
                               f"({', '.join(f for f, ok in same.items() if not ok)} differ)")
    return {k: v for k, v in load_file(other.backbone_path).items() if k.startswith("backbone.")}


def build_zoo(out_dir: str | Path, config: ZooConfig = ZooConfig(), progress: bool = True, device: str = "cpu",
              *, splits_dir: str | Path = DEFAULT_SPLITS_DIR, num_threads: int | None = None,
              overwrite: bool = False, pretrained_from: str | Path | None = None) -> Zoo:
    """Build (or resume, or extend) the zoo in ``out_dir`` and return it.

    Args:
        out_dir: folder for the zoo's files (created if missing).
        config: the recipe; a zoo on disk built with another recipe raises ZooMismatchError.
        progress: show tqdm bars.
        device: torch device for training; bitwise reproducibility is only checked on CPU.
        splits_dir: folder of the committed split files.
        num_threads: torch CPU threads during the build (restored afterwards); None keeps the current.
        overwrite: delete a zoo built with another recipe instead of raising.
        pretrained_from: a built zoo with the same pre-training (``PRETRAIN_FIELDS`` and architecture, any
            task): its backbone is reused instead of pre-training again. Pre-training is deterministic, so
            the zoo is the same as without it (on the same machine and threads), only cheaper.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temporaries(out)
    splits = zoo_splits(out, config, splits_dir, create=True)
    info = files.read_json(out / "zoo.json")
    if info is not None and (why := _mismatch(info, config, splits)):
        if not overwrite:
            raise ZooMismatchError(f"{out} holds a zoo of another recipe ({'; '.join(why)}); "
                                   "pass overwrite=True (--overwrite) to rebuild it, or use another folder")
        info = None
    with _threads(num_threads):
        data = load_train_data(config, splits, device)
        backbone = out / "backbone.safetensors"
        if info is None or not backbone.is_file() or sha256_file(backbone) != info["backbone"]["sha256"]:
            files.clear(out)  # without a valid zoo.json + backbone no other file here can be trusted
            t0 = time.perf_counter()
            shared = _shared_backbone(pretrained_from, config) if pretrained_from is not None else None
            model = pretrain_and_probe(config, data, device, progress, backbone=shared)
            info = {
                "format": FORMAT_VERSION, "splits_fingerprint": splits.fingerprint,
                "backbone": {
                    "file": backbone.name,
                    "sha256": files.atomic_save(model.state_dict(), backbone, {"kind": "pretrained+lp"}),
                    "pretrain_seconds": round(time.perf_counter() - t0, 2),
                    "lp_heldout_acc": accuracy(logits_of(model, data.held_x), data.held_y),
                    "lp_test_acc": accuracy(logits_of(model, data.test_x), data.test_y),
                },
            }
            report(f"{out.name}: backbone pre-trained and probed in {info['backbone']['pretrain_seconds']:.0f} s")
            if pretrained_from is not None:
                info["backbone"]["pretrained_from"] = str(pretrained_from)
        info["config"] = config.to_dict()
        atomic_write_text(out / "zoo.json", json.dumps(info, indent=1) + "\n")
        with torch.random.fork_rng():  # the random init is overwritten; keep the caller's RNG untouched
            start = build_classifier(config.model).to(device)
        start.load_state_dict(load_file(backbone, device=device))
        records = files.read_records(out)
        todo = [i for i in range(config.k) if i not in records]
        for i in tqdm(todo, desc="fine-tunes", disable=not progress or not todo):
            hp = sample_hparams(config, i)
            model = copy.deepcopy(start)
            t0 = time.perf_counter()
            _train(model, data.ft_x, data.ft_y, epochs=hp.epochs, lr=hp.lr, weight_decay=hp.weight_decay,
                   label_smoothing=hp.label_smoothing, aug=hp.aug_strength, seed=hp.seed, config=config)
            seconds = time.perf_counter() - t0
            path = out / f"model_{i:03d}.safetensors"
            sha = files.atomic_save(model.state_dict(), path, {"index": i, "hparams": asdict(hp)})
            records[i] = {
                "index": i, "file": path.name, "sha256": sha, "hparams": asdict(hp),
                "heldout_acc": accuracy(logits_of(model, data.held_x), data.held_y),
                "test_acc": accuracy(logits_of(model, data.test_x), data.test_y),
                "finetune_seconds": round(seconds, 2),
            }
            files.write_records(out, records)  # after the checkpoint: a line always points at a whole file
            report(f"{out.name}: fine-tune {len(records)}/{config.k} done in {seconds:.0f} s "
                   f"(held-out accuracy {100 * records[i]['heldout_acc']:.2f} %)")
    return load_zoo(out)


def load_zoo(out_dir: str | Path) -> Zoo:
    """Read a complete zoo written by ``build_zoo``; raises if any of its k models is missing or altered."""
    out = Path(out_dir)
    info = files.read_json(out / "zoo.json")
    if info is None:
        raise FileNotFoundError(f"no zoo.json in {out}; build it with `python -m soupkit.zoo --out {out}`")
    config = ZooConfig.from_dict(info.pop("config"))
    records = files.read_records(out)
    missing = [i for i in range(config.k) if i not in records]
    if missing:
        raise FileNotFoundError(f"{out}: models {missing} missing or altered; run build_zoo again to resume")
    return Zoo(out, config, tuple(records[i] for i in range(config.k)), info)


def main(argv: Sequence[str] | None = None) -> Zoo:
    """CLI: ``python -m soupkit.zoo --out outputs/zoo --k 32``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/zoo")
    p.add_argument("--k", type=int, default=ZooConfig.k)
    p.add_argument("--search-seed", type=int, default=ZooConfig.search_seed)
    p.add_argument("--pretrain-seed", type=int, default=ZooConfig.pretrain_seed)
    p.add_argument("--task", default=ZooConfig.task, choices=TASKS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is faster when other jobs share the cores")
    p.add_argument("--overwrite", action="store_true", help="rebuild a zoo made with another recipe")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    config = ZooConfig(k=a.k, search_seed=a.search_seed, pretrain_seed=a.pretrain_seed, task=a.task)
    t0 = time.perf_counter()
    try:
        zoo = build_zoo(a.out, config, progress=not a.no_progress, device=a.device, num_threads=a.threads,
                        overwrite=a.overwrite)
    except ZooMismatchError as err:
        p.error(str(err))
    held = np.array([r["heldout_acc"] for r in zoo.records])
    test = np.array([r["test_acc"] for r in zoo.records])
    bb = zoo.info["backbone"]
    print(f"zoo of {len(zoo.records)} models in {zoo.out_dir} ({time.perf_counter() - t0:.0f} s this run)\n"
          f"linear probe: held-out {bb['lp_heldout_acc']:.4f}  test {bb['lp_test_acc']:.4f}\n"
          f"held-out acc min/mean/max {held.min():.4f} / {held.mean():.4f} / {held.max():.4f}\n"
          f"test acc     min/mean/max {test.min():.4f} / {test.mean():.4f} / {test.max():.4f}")
    return zoo


if __name__ == "__main__":
    main()
