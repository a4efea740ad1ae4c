"""Tiny models and pools shared by the tests: an MLP with BatchNorm and a model with tied weights."""
from __future__ import annotations

import pytest

import soupkit  # noqa: F401  (first: it pins the CPU numerics before torch loads, soupkit/runtime/numerics.py)
import torch
from torch import nn

torch.set_num_threads(1)  # tiny models: threads only add overhead, and tests run beside other jobs


class BNNet(nn.Module):
    """8 → 16 (BatchNorm, ReLU) → 3: has floating buffers and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class TiedNet(nn.Module):
    """An input and output projection sharing one weight (``dec.weight`` is ``enc.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4, bias=False)
        self.mid = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 6, bias=False)
        self.dec.weight = self.enc.weight  # tied, [4, 6]: encoder and (transposed) decoder share it
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(x @ self.enc.weight.T))
        return self.head(h @ self.dec.weight)


def load_benchmark(script: str):
    """``benchmarks/<script>.py`` loaded by path as ``soupkit_bench_<script>``; the entry script puts benchmarks/ on
    sys.path for its helper modules."""
    import importlib.util
    import sys
    from pathlib import Path

    name = f"soupkit_bench_{script}"
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def save_files(states: list[dict], directory, fmt: str = "safetensors") -> list:
    """Write each state dict to ``directory/m{i}.{fmt}`` (safetensors, or torch.save for pt/pth)."""
    import soupkit  # noqa: PLC0415

    paths = []
    for i, s in enumerate(states):
        path = directory / f"m{i}.{fmt}"
        soupkit.save_state_dict(s, path) if fmt == "safetensors" else torch.save(s, path)
        paths.append(path)
    return paths


def make_data(n: int = 160, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 40) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def finetunes(factory, x, y, k: int, steps: int = 25, seed: int = 0) -> tuple[nn.Module, list[dict]]:
    """A 'pretrained' model and k fine-tunes of it with different learning rates and data orders."""
    torch.manual_seed(seed)
    base = factory()
    out = []
    for i in range(k):
        m = factory()
        m.load_state_dict(base.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=0.03 * (i + 1))
        g = torch.Generator().manual_seed(seed + i)
        m.train()
        for _ in range(steps):
            idx = torch.randperm(len(y), generator=g)[:64]
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
        out.append({n: t.detach().clone() for n, t in m.state_dict().items()})
    return base, out


@pytest.fixture(scope="session")
def bn_setup():
    x, y = make_data()
    base, states = finetunes(BNNet, x, y, k=5)
    return base, states, batches(x, y)


@pytest.fixture(scope="session")
def tied_setup():
    x, y = make_data(d=6, seed=1)
    base, states = finetunes(TiedNet, x, y, k=4)
    return base, states, batches(x, y)


def install_tiny_arch(monkeypatch, directory, k: int, built: dict | None = None):
    """``--arch``'s builders replaced by BNNet and in-memory splits (200 points: 100 / 60 / 40); ``k`` fine-tunes
    written to ``directory`` as ``model_{i}.pt``. ``built`` (if given) records what the CLI asked to build."""
    from torch.utils.data import TensorDataset  # noqa: PLC0415

    from soupkit.zoo import clip as clip_models, realdata  # noqa: PLC0415

    x, y = make_data(n=200)
    _, states = finetunes(BNNet, x, y, k=k)
    for i, s in enumerate(states):
        torch.save(s, directory / f"model_{i}.pt")
    record = built if built is not None else {}

    def build(num_classes, arch, *, keep_text_leftovers=False, **_):
        record.update(num_classes=num_classes, arch=arch, keep=keep_text_leftovers)
        return BNNet()

    def splits(dataset, root, transform, split_file, *, seed=0, **_):
        record.update(dataset=dataset, root=root, split_file=split_file)
        part = lambda a, b: TensorDataset(x[a:b], y[a:b])  # noqa: E731
        split = realdata.HeldoutSplit((), (), 0, "test", seed, "")
        return realdata.DataSplits(part(0, 100), part(100, 160), part(160, 200), ("a", "b", "c"), split)

    monkeypatch.setattr(clip_models, "build_model_soups_model", build)
    monkeypatch.setattr(clip_models, "preprocess_config", lambda model: {})
    monkeypatch.setattr(realdata, "clip_transform", lambda cfg, is_train=False: None)
    monkeypatch.setattr(realdata, "dataset_splits", splits)
    return directory
