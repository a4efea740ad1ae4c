"""Fine-tuning sweep that builds a zoo for soups (MEHL-Soup Appendix B): random search over lr and weight decay.

``python -m soupkit.zoo.sweep --arch ViT-L-14-quickgelu --pretrained openai --dataset cifar10 --root DATA --out DIR --k 32``

Every model starts from the same initial weights (saved once as ``DIR/init.safetensors``: the pretrained
image tower plus a zero-shot or seeded random head) - shared initialisation is what makes weight
averaging work. Model ``i`` draws its hyperparameters from ``(seed, i)`` alone, so a sweep can be
resumed or extended to a larger ``k``. Each model is fine-tuned (AdamW, linear warm-up + cosine, batch
128, 10 epochs by default), evaluated on the held-out split, and written as ``DIR/model_{i:03d}.safetensors``
(state-dict layout of ``clip_models.build_model_soups_model``); ``DIR/models.jsonl`` gets one line per
finished model (index, file, sha256, hparams, heldout_acc, test_acc, finetune_seconds: the fields of
``soupkit.zoo``'s records), rewritten atomically. ``DIR/split.json`` fixes the held-out images that
fine-tuning never sees; soups must use the same file.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from soupkit.engine.batches import make_loader
from soupkit.engine.schedule import warmup_cosine
from soupkit.errors import SweepError
from soupkit.io import atomic_write_json, atomic_write_text, sha256_file
from soupkit.methods.result import evaluate
from soupkit.pool.formats import load_state_dict, save_state_dict
from soupkit.runtime._compat import import_open_clip
from soupkit.zoo.clip import SoupClassifier, classifier_from_clip, create_clip, load_weights, preprocess_config
from soupkit.zoo.realdata import DataSplits, clip_transform, dataset_splits
from soupkit.zoo.zeroshot import zeroshot_head

__all__ = ["SweepConfig", "sample_hparams", "run_sweep", "main"]

RESULTS_NAME = "models.jsonl"  # same name and record fields as soupkit.zoo
CONFIG_NAME = "sweep_config.json"
INIT_NAME = "init.safetensors"
# Fields that determine the models; resuming with other values would mix two zoos in one folder.
_IDENTITY = ("arch", "pretrained", "dataset", "epochs", "batch_size", "lr_min", "lr_max", "wd_choices",
             "warmup_steps", "grad_clip", "label_smoothing", "head_init", "seed", "precision", "max_steps")
_HELP = {
    "pretrained": "open_clip pretrained tag or checkpoint path (none: random weights)",
    "epochs": "epochs per model", "batch_size": "images per step", "lr_min": "lr ~ log-uniform [lr-min, lr-max]",
    "lr_max": "see --lr-min", "wd_choices": "weight decay drawn uniformly from these", "warmup_steps":
    "linear warm-up steps before the cosine decay", "grad_clip": "max gradient norm", "label_smoothing":
    "cross-entropy label smoothing", "head_init": "auto: zero-shot head when --pretrained, else random",
    "seed": "seeds the sweep (hyperparameters, data order, split, random init)", "device": "auto: cuda if available",
    "precision": "autocast dtype", "num_workers": "DataLoader workers", "split_file":
    "held-out split JSON; None: OUT/split.json", "max_steps": "cap optimizer steps per model (smoke runs)",
}
_CHOICES = {"head_init": ["auto", "zeroshot", "random"], "precision": ["fp32", "bf16", "fp16"]}


@dataclass(frozen=True)
class SweepConfig:
    """One sweep. The paper's lr/wd ranges were lost in its text extraction: the defaults are ours."""

    arch: str
    dataset: str  # "cifar10" | "cifar100" | "imagenet"
    root: str
    out: str
    k: int
    pretrained: str | None = None  # open_clip tag ("openai") or file; None = random weights
    epochs: int = 10
    batch_size: int = 128
    lr_min: float = 3e-6  # lr ~ log-uniform [lr_min, lr_max]
    lr_max: float = 3e-5
    wd_choices: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    warmup_steps: int = 500
    grad_clip: float = 1.0  # max grad norm, as model-soups' fine-tuning
    label_smoothing: float = 0.0
    head_init: str = "auto"  # "zeroshot" | "random" | "auto" (zero-shot when pretrained)
    seed: int = 0
    device: str = "auto"  # "auto" = cuda if available
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast)
    num_workers: int = 4
    split_file: str | None = None  # default DIR/split.json
    eval_test: bool = False
    max_steps: int | None = None  # cap optimizer steps per model (smoke runs)
    progress: bool = True


def sample_hparams(index: int, config: SweepConfig) -> dict[str, Any]:
    """Hyperparameters of model ``index``: a function of ``(config.seed, index)`` only."""
    rng = np.random.default_rng([config.seed, index])
    lr = float(math.exp(rng.uniform(math.log(config.lr_min), math.log(config.lr_max))))
    wd = float(config.wd_choices[rng.integers(len(config.wd_choices))])
    return {"lr": lr, "weight_decay": wd, "data_seed": int(rng.integers(2**31))}


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def _initial_classifier(clip: nn.Module, classes: Sequence[str], config: SweepConfig,
                        device: torch.device) -> SoupClassifier:
    """Wrap ``clip`` with a zero-shot head (text embeddings x CLIP's logit scale, as model-soups) or a random one."""
    head_init = config.head_init if config.head_init != "auto" else ("zeroshot" if config.pretrained else "random")
    head = None
    if head_init == "zeroshot":
        head = zeroshot_head(clip, config.arch, classes, import_open_clip().SIMPLE_IMAGENET_TEMPLATES, device)
    elif head_init != "random":
        raise ValueError(f"head_init must be 'zeroshot', 'random' or 'auto', got {config.head_init!r}")
    torch.manual_seed(config.seed)  # a random head is the same for every model and every restart
    return classifier_from_clip(clip, len(classes), head_weight=head).to(device)


def _check_or_write_config(out: Path, config: SweepConfig) -> None:
    path = out / CONFIG_NAME
    wanted = {k: v for k, v in asdict(config).items() if k in _IDENTITY}
    wanted["wd_choices"] = list(config.wd_choices)
    if path.exists():
        found = json.loads(path.read_text())
        differ = [k for k in _IDENTITY if found.get(k) != wanted[k]]
        if differ:
            raise SweepError(f"{path}: this folder holds a sweep with other settings "
                             f"({', '.join(f'{k}={found.get(k)!r} vs {wanted[k]!r}' for k in differ)}); "
                             "use another --out")
        return
    atomic_write_json(path, wanted)


def _read_results(out: Path) -> dict[int, dict]:
    path = out / RESULTS_NAME
    if not path.exists():
        return {}
    records = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
                records[int(record["index"])] = record
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise SweepError(f"{path}: line {n} is not a sweep record ({err})") from err
    # a record counts only if its weights file is there, whole and unchanged
    return {i: r for i, r in records.items()
            if (out / r["file"]).is_file() and sha256_file(out / r["file"]) == r.get("sha256")}


def _write_results(out: Path, records: dict[int, dict]) -> None:
    atomic_write_text(out / RESULTS_NAME, "".join(json.dumps(records[i]) + "\n" for i in sorted(records)))


def _train_one(model: SoupClassifier, data: DataSplits, hp: dict[str, Any], config: SweepConfig,
               device: torch.device, index: int) -> int:
    loader = make_loader(data.train, config.batch_size, shuffle=True, seed=hp["data_seed"],
                         num_workers=config.num_workers, pin_memory=device.type == "cuda")
    total = config.epochs * len(loader)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    warmup = min(config.warmup_steps, max(total - 1, 0))  # a warm-up longer than the run is capped
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    model.train()
    step = 0
    with tqdm(total=total, desc=f"model {index}", disable=not config.progress, leave=False) as bar:
        while step < total:
            for images, labels in loader:
                with _autocast(device, config.precision):
                    loss = loss_fn(model(images.to(device, non_blocking=True)), labels.to(device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"model {index}: loss became {loss.item()} at step {step} "
                                             f"(lr {hp['lr']:.2e}); lower --lr-max")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                step += 1
                bar.update(1)
                if step >= total:
                    break
    return step


def run_sweep(config: SweepConfig) -> list[dict]:
    """Fine-tune models ``0..k-1`` that are not finished yet in ``config.out``; returns all records by index."""
    out = Path(config.out)
    _check_or_write_config(out, config)
    device = torch.device(config.device if config.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    records = _read_results(out)
    todo = [i for i in range(config.k) if i not in records]
    if not todo:
        return [records[i] for i in sorted(records)]

    torch.manual_seed(config.seed)  # random backbone weights: identical for every model and every restart
    clip = create_clip(config.arch, config.pretrained, device).eval()
    transform = clip_transform(preprocess_config(clip))
    data = dataset_splits(config.dataset, config.root, transform, config.split_file or str(out / "split.json"),
                       seed=config.seed)
    model = _initial_classifier(clip, data.classes, config, device)
    del clip  # the text tower is no longer needed: free its memory for the whole sweep
    init_path = out / INIT_NAME
    if init_path.exists():  # restarts reuse the saved start point, whatever the RNG or library versions
        load_weights(model, load_state_dict(init_path), source=str(init_path))
    else:
        save_state_dict(model.state_dict(), init_path, metadata={"arch": config.arch})
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    heldout = make_loader(data.heldout, config.batch_size, num_workers=config.num_workers)
    test = make_loader(data.test, config.batch_size, num_workers=config.num_workers) if config.eval_test else None

    for index in todo:
        hp = sample_hparams(index, config)
        model.load_state_dict(init_state)
        start = time.perf_counter()
        steps = _train_one(model, data, hp, config, device, index)
        seconds = time.perf_counter() - start
        hparams = {"lr": hp["lr"], "weight_decay": hp["weight_decay"], "epochs": config.epochs,
                   "batch_size": config.batch_size, "label_smoothing": config.label_smoothing,
                   "data_seed": hp["data_seed"], "steps": steps}
        path = out / f"model_{index:03d}.safetensors"
        # weights first, then the line: a record always points at a whole file
        save_state_dict(model.state_dict(), path,
                        metadata={"soupkit": json.dumps({"index": index, "hparams": hparams})})
        records[index] = {"index": index, "file": path.name, "sha256": sha256_file(path), "hparams": hparams,
                          "heldout_acc": evaluate(model, model.state_dict(), heldout, device),
                          "test_acc": evaluate(model, model.state_dict(), test, device) if test else None,
                          "finetune_seconds": round(seconds, 2), "arch": config.arch,
                          "pretrained": config.pretrained, "dataset": config.dataset}
        _write_results(out, records)
        print(f"model {index}: lr {hp['lr']:.2e} wd {hp['weight_decay']:g} held-out acc "
              f"{records[index]['heldout_acc']:.4f} ({seconds:.0f} s)", flush=True)
    return [records[i] for i in sorted(records)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m soupkit.zoo.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = SweepConfig(arch="", dataset="", root="", out="", k=0)
    p.add_argument("--arch", required=True, help="open_clip model name, e.g. ViT-L-14-quickgelu")
    p.add_argument("--dataset", required=True, choices=["cifar10", "cifar100", "imagenet"])
    p.add_argument("--root", required=True, help="data folder (CIFAR: holds cifar-10-batches-py/...)")
    p.add_argument("--out", required=True, help="output folder of the zoo")
    p.add_argument("--k", type=int, required=True, help="number of models")
    p.add_argument("--model-config", help="extra open_clip model config JSON (its file name is the arch name)")
    for field in fields(SweepConfig):
        if field.name in {"arch", "dataset", "root", "out", "k", "progress", "eval_test"}:
            continue
        value = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if field.name == "wd_choices":
            p.add_argument(flag, type=float, nargs="+", default=list(value), help=_HELP[field.name])
        elif field.name in {"pretrained", "split_file"}:
            p.add_argument(flag, default=value, help=_HELP[field.name])
        elif field.name == "max_steps":
            p.add_argument(flag, type=int, default=value, help=_HELP[field.name])
        elif field.name in _CHOICES:
            p.add_argument(flag, default=value, choices=_CHOICES[field.name], help=_HELP[field.name])
        else:
            p.add_argument(flag, type=type(value), default=value, help=_HELP[field.name])
    p.add_argument("--eval-test", action="store_true", help="also record test accuracy")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; ``argv`` as a list lets tests run a whole sweep in-process."""
    args = _parser().parse_args(argv)
    if args.model_config:
        import_open_clip().add_model_config(Path(args.model_config))
    values = {f.name: getattr(args, f.name) for f in fields(SweepConfig) if hasattr(args, f.name)}
    values.update(wd_choices=tuple(args.wd_choices), progress=not args.no_progress, eval_test=args.eval_test)
    run_sweep(SweepConfig(**values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
