"""Run by `make test` in a fresh venv holding only `pip install .` (no editable install, no extras), from a folder
outside the checkout: the library's core imports with torch, safetensors, numpy and tqdm alone, finds its
package data, and `make_soup` runs on a tiny pool."""
import sys
from pathlib import Path

import soupkit  # first: pins the CPU numerics before torch loads

import torch
from torch import nn

here = Path(soupkit.__file__).resolve().parent
assert "site-packages" in here.parts, f"soupkit imported from {here}, not from the installed package"
for module in ("pandas", "matplotlib", "open_clip", "torchvision", "yaml"):
    assert module not in sys.modules, f"import soupkit pulled in {module}"
    try:
        __import__(module)
    except ImportError:
        pass
    else:
        raise AssertionError(f"{module} is installed: this venv should hold the core dependencies only")
from soupkit.zoo.embedded_data import DEFAULT_SPLITS_DIR  # noqa: E402  (package data, not the checkout)

assert (DEFAULT_SPLITS_DIR / "animal_mnist_v3.json").is_file() and "site-packages" in DEFAULT_SPLITS_DIR.parts

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
base = {k: v.clone() for k, v in model.state_dict().items()}
pool = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(4)]
x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
for method in ("uniform", "greedy", "mehl+"):
    soup = soupkit.make_soup(method, model, pool, loader, progress=False, inner_iterations=3)
    assert soup.coefficients.shape[0] == 4
    accuracy = soupkit.evaluate(model, soup, loader)
    print(f"{method}: held-out accuracy {accuracy:.3f}, peak memory {soup.stats['peak_memory_bytes']} B")
print(f"installed soupkit {soupkit.__version__} from {here}: make_soup ran")
