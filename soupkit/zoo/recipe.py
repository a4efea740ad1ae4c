"""The training recipe of ``soupkit.zoo``: the data of one build, the AdamW loop, pre-training + linear probe.

Everything here is a pure function of the zoo's config (and the seeds in it): ``soupkit.zoo`` decides what
to train and where the files go.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from soupkit.engine.batches import make_loader
from soupkit.engine.schedule import warmup_cosine
from soupkit.zoo.embedded_data import Splits, augment, load_animal_mnist, load_mnist5k, load_task, to_tensor
from soupkit.zoo.embedded_models import ViTClassifier, build_classifier

if TYPE_CHECKING:  # pragma: no cover
    from soupkit.zoo.config import ZooConfig

PRETRAIN_SOURCES = ("animal_coarse", "mnist5k", "animal_coarse+mnist5k")
# Fields of ZooConfig that determine the pre-trained backbone (not the task, the probe or the fine-tunes):
# two zoos that agree on them have byte-identical backbones, so one may reuse the other's.
PRETRAIN_FIELDS = ("split_name", "batch_size", "warmup_frac", "pretrain_source", "pretrain_epochs", "pretrain_lr",
                   "pretrain_weight_decay", "pretrain_aug", "pretrain_seed", "max_pretrain")


@dataclass(frozen=True)
class TrainData:
    """Tensors of one build: x [N, C, 28, 28] float32, y [N] int64, on the build's device."""

    pre_x: torch.Tensor
    pre_y: torch.Tensor
    ft_x: torch.Tensor
    ft_y: torch.Tensor
    held_x: torch.Tensor
    held_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_train_data(config: "ZooConfig", splits: Splits, device: str) -> TrainData:
    """Pre-training data (always clean Animal-MNIST / MNIST, shared by every task, like CLIP's), then the
    fine-tune, held-out and test images of the zoo's task."""
    task_images, task_labels = load_task(config.task)
    ch = config.model.in_channels

    def part(name: str, n: int | None, images=task_images, labels=task_labels) -> tuple[torch.Tensor, torch.Tensor]:
        idx = splits.subset(name, n)
        return to_tensor(images[idx], ch).to(device), torch.from_numpy(labels[idx]).to(device)

    if config.pretrain_source not in PRETRAIN_SOURCES:
        raise ValueError(f"pretrain_source must be one of {PRETRAIN_SOURCES}, got {config.pretrain_source!r}")
    xs, ys = [], []
    if "animal_coarse" in config.pretrain_source:
        x, y = part("pretrain", config.max_pretrain, *load_animal_mnist())
        xs.append(x)
        ys.append(y % 5)
    if "mnist5k" in config.pretrain_source:
        mi, ml = load_mnist5k()
        n = config.max_pretrain or len(ml)
        # With both sources, digits take labels 5-14 after the coarse animal ones: one head, two tasks.
        offset = 5 if ys else 0
        xs.append(to_tensor(mi[:n], ch).to(device))
        ys.append(torch.tensor(ml[:n], device=device) + offset)
    return TrainData(torch.cat(xs), torch.cat(ys), *part("finetune", config.max_finetune),
                     *part("heldout", config.max_eval), *part("test", config.max_eval))


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
          weight_decay: float, label_smoothing: float, aug: float, seed: int, config: "ZooConfig",
          desc: str | None = None) -> None:
    """AdamW with linear warm-up then cosine decay, per step, on x [N, C, H, W], y [N]."""
    loader = make_loader((x, y), config.batch_size, shuffle=True, seed=seed, drop_last=len(y) > config.batch_size)
    total = max(1, epochs * len(loader))
    warmup = max(1, int(config.warmup_frac * total))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warmup))
    gen = torch.Generator().manual_seed(seed + 1)  # augmentation noise, independent of the data order
    model.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False, disable=desc is None):
        for xb, yb in loader:
            # Noise is drawn on the CPU so a GPU build sees the same jitter as a CPU one.
            xb = augment(xb.cpu(), aug, gen).to(xb.device) if aug > 0 else xb
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Logits ``[N, classes]`` of x ``[N, C, H, W]`` in eval mode; small batches run faster on CPU (cache)."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def pretrain_and_probe(config: "ZooConfig", data: TrainData, device: str, progress: bool,
                       backbone: dict[str, torch.Tensor] | None = None) -> ViTClassifier:
    """Pre-train the backbone on coarse labels (or take ``backbone``, the ``backbone.*`` tensors of a zoo
    with the same pre-training), then fit the shared LP head on frozen features of the task."""
    n_pre = int(data.pre_y.max()) + 1
    with torch.random.fork_rng():  # the initialisation is seeded without touching the caller's RNG
        torch.manual_seed(config.pretrain_seed)
        pre = build_classifier(dataclasses.replace(config.model, num_classes=n_pre)).to(device)
        model = build_classifier(config.model).to(device)  # its random init is overwritten below
    if backbone is None:
        train(pre, data.pre_x, data.pre_y, epochs=config.pretrain_epochs, lr=config.pretrain_lr,
              weight_decay=config.pretrain_weight_decay, label_smoothing=0.0, aug=config.pretrain_aug,
              seed=config.pretrain_seed, config=config, desc="pre-train" if progress else None)
        model.backbone.load_state_dict(pre.backbone.state_dict())
    else:
        model.backbone.load_state_dict({k.removeprefix("backbone."): v.to(device) for k, v in backbone.items()})
    with torch.no_grad():
        # Frozen features: BatchNorm layers use (and keep) their running statistics. The rest stays in train
        # mode as when the default zoo was recorded: MultiheadAttention's eval fast path differs in the last
        # bits, and the default zoo's checkpoints must stay byte-identical.
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        feats = torch.cat([model.features(data.ft_x[i:i + 1000]) for i in range(0, len(data.ft_y), 1000)])
        model.head.weight.zero_(), model.head.bias.zero_()  # convex problem: start at 0, no RNG needed
    opt = torch.optim.AdamW(model.head.parameters(), lr=config.lp_lr, weight_decay=config.lp_weight_decay)
    for _ in range(config.lp_steps):
        loss = F.cross_entropy(model.head(feats), data.ft_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()
