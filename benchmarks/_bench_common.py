"""Shared pieces of the memory/time benchmark: the model, the K checkpoints, the held-out data, the environment.

The model: open_clip's ``ViT-B-32`` vision tower with QuickGELU (OpenAI CLIP ViT-B/32 as in model-soups, 87.8 M
parameters) with random weights, L2-normalised features and a linear head over 1000 classes (ImageNet's, as the
model-soups checkpoints): 88.4 M parameters, 337 MiB in fp32. The K "fine-tunes" are the base plus seeded
Gaussian noise (``--noise`` x each tensor's std), written as safetensors and read through
``soupkit.CheckpointPool``. The held-out set is random 224 px images with random labels: only memory and time
are measured, never accuracy.

Also here: the result columns (``CSV_COLUMNS``), the glibc settings of the measuring processes (``MALLOC_ENV``)
and the device, malloc and thread helpers the workers and the CLI share. Imported by name from
``benchmarks/memory_time.py`` (which puts this folder on ``sys.path``).
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:
    import soupkit  # noqa: F401  (before torch: it pins the CPU numerics)
except ImportError:  # run from a checkout without an editable install
    sys.path.insert(0, str(ROOT))
    import soupkit  # noqa: F401

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from soupkit.runtime._compat import import_open_clip  # noqa: E402

METHODS = ("learned+", "hl+", "mehl+")
CSV_COLUMNS = [
    "method", "K", "model_batch_size", "status", "peak_memory_bytes", "peak_memory_gib", "peak_in_models",
    "memory_source", "malloc", "start_rss_bytes", "memory_run_blocks", "max_resident_models",
    "peak_memory_bytes_default_malloc", "time_status", "seconds_total", "seconds_per_epoch", "epochs",
    "inner_iterations", "outer_iterations", "heldout_images", "batch_size", "arch", "num_classes", "num_parameters",
    "model_bytes", "device", "device_name", "torch_version", "open_clip_version", "threads", "loadavg_1min",
]

# glibc's dynamic mmap threshold lets freed tensors stay in fragmented heap arenas, so the CPU peak RSS of the
# same run varied by 50 % here (Learned-Soup+ K = 4: 6.6 to 9.9 models' worth over 5 runs). A fixed threshold
# returns every tensor >= 128 KiB to the OS when freed: the RSS then follows the live tensors (what
# torch.cuda.max_memory_allocated reports on a GPU) and repeats to 0.1 %. Set for the memory workers on CPU only.
# glibc.malloc.hugetlb=1 backs those mappings with transparent huge pages: fewer page faults, same peaks.
MALLOC_ENV = {"live": {"MALLOC_MMAP_THRESHOLD_": "131072", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
              "default": {}}

# a tiny architecture for the smoke test (same code path: open_clip vision tower + linear head)
TINY_VISION = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 4.0}
TINY_EMBED = 16


# ---- model, checkpoints, data --------------------------------------------------------------------------------
class Classifier(nn.Module):
    """``head(normalize(visual(x)))``: an open_clip vision tower and a linear head (as model-soups' wrapper)."""

    def __init__(self, visual: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(nn.functional.normalize(self.visual(x), dim=-1))


def build_model(arch: str = "ViT-B-32", num_classes: int = 1000, seed: int = 0) -> Classifier:
    """``arch``: an open_clip model name (its vision tower is built, with QuickGELU) or ``"tiny"``."""
    open_clip = import_open_clip()
    from open_clip.model import _build_vision_tower  # noqa: PLC0415  (the factory open_clip uses itself)

    if arch == "tiny":
        embed_dim, vision_cfg = TINY_EMBED, dict(TINY_VISION)
    else:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(f"unknown open_clip architecture {arch!r}")
        embed_dim, vision_cfg = cfg["embed_dim"], dict(cfg["vision_cfg"])
    torch.manual_seed(seed)
    visual = _build_vision_tower(embed_dim, vision_cfg, quick_gelu=True)
    return Classifier(visual, embed_dim, num_classes)


def image_size(model: Classifier) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def make_checkpoints(model: nn.Module, k: int, directory: Path, seed: int = 0, noise: float = 1e-3,
                     dtype: torch.dtype | None = None, device: str = "cpu") -> list[Path]:
    """K synthetic fine-tunes ``base + noise * std(tensor) * N(0, 1)`` (seeded per model) as safetensors.

    ``dtype``: the files' floating dtype (None: the model's; float16 halves what is written and read, and the
    reader then casts: ``CheckpointPool(cast_dtype=...)``). ``device``: where the noise is drawn (on a GPU, not
    the CPU's ~2 s of ``randn`` per ViT-B/32 model measured here; other numbers than the CPU's).
    Files of an earlier run with the same manifest are reused.
    """
    directory.mkdir(parents=True, exist_ok=True)
    base = {k_: v.detach().to(device) for k_, v in model.state_dict().items()}
    manifest = {"keys": len(base), "numel": sum(v.numel() for v in base.values()), "seed": seed, "noise": noise,
                "base_checksum": float(sum(v.double().sum() for v in base.values() if v.is_floating_point()))}
    if dtype is not None or torch.device(device).type != "cpu":  # older manifests stay valid
        manifest.update(dtype=str(dtype), noise_device=torch.device(device).type)
    paths = [directory / f"model_{i:03d}.safetensors" for i in range(k)]
    meta = directory / "manifest.json"
    if meta.exists() and json.loads(meta.read_text()).get("config") == manifest and all(p.exists() for p in paths):
        return paths
    for p in directory.glob("model_*.safetensors"):
        p.unlink()
    meta.unlink(missing_ok=True)
    stds = {key: (v.float().std().item() if v.numel() > 1 else abs(v.item())) or 1.0
            for key, v in base.items() if v.is_floating_point()}
    for i, path in enumerate(paths):
        gen = torch.Generator(device=device).manual_seed(seed * 100_003 + i + 1)
        state = {key: (torch.randn(v.shape, generator=gen, dtype=v.dtype, device=v.device).mul_(noise * stds[key])
                       .add_(v).to(dtype or v.dtype) if v.is_floating_point() else v.clone()).cpu().contiguous()
                 for key, v in base.items()}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)
        del state
    meta.write_text(json.dumps({"config": manifest, "n": k}))
    return paths


def heldout(n: int, batch: int, size: int, num_classes: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``n`` random images ``[3, size, size]`` with random labels, in batches (a re-iterable list)."""
    gen = torch.Generator().manual_seed(seed + 12345)
    x = torch.randn(n, 3, size, size, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


# ---- environment ---------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def environment(device: str) -> dict[str, Any]:
    open_clip = import_open_clip()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"device": str(device), "device_name": device_name(device), "torch_version": torch.__version__,
            "open_clip_version": open_clip.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "loadavg_1_5_15": load}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _malloc_state(device: str) -> str:
    if torch.device(device).type == "cuda":
        return "cuda caching allocator"
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return f"live (MALLOC_MMAP_THRESHOLD_={threshold})" if threshold else "default"


def default_cap_bytes(device: str) -> int:
    """75 % of physical memory (CPU) or 90 % of the GPU's memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(dev).total_memory)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(0.75 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 16 * 2**30


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))
