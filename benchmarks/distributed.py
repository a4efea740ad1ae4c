"""Per-rank peak memory and time per epoch of MEHL-Soup+ on one process vs two (data and model parallel).

    python benchmarks/distributed.py                      # CPU, gloo: prints the table
    python benchmarks/distributed.py --device cuda --nproc 2 --backend nccl

Builds a synthetic pool of K token MLPs (a base model plus K perturbations, as fine-tunes of one model; each
example is ``--tokens`` tokens, so a step costs about what it costs a ViT per parameter and image), then runs
``make_soup("mehl+")`` once per configuration, each in fresh processes (``torchrun`` for N > 1), so every
peak is the process's own (``PeakMemory``: VmHWM on CPU, the allocator's peak on CUDA). On CPU the processes
run with ``MALLOC_MMAP_THRESHOLD_=131072`` (as ``memory_time.py --malloc live``), so a freed tensor leaves the
resident set and the peak follows the live tensors. Every process uses ``--threads`` CPU threads; on a machine
with fewer cores than N × threads the processes share them. Each configuration runs ``--repeats`` times: the
fastest run's time, the largest peak.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import soupkit  # noqa: E402


class TokenMLP(nn.Module):
    """x ``[B, T, d_in]`` → the same MLP on every token → mean over the T tokens → logits ``[B, classes]``."""

    def __init__(self, width: int, depth: int, d_in: int, classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.body, self.head = nn.Sequential(*layers), nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=1))


def mlp(args: argparse.Namespace) -> nn.Module:
    """About depth · width² parameters."""
    return TokenMLP(args.width, args.depth, args.d_in, args.classes)


def write_inputs(directory: Path, args: argparse.Namespace) -> None:
    """K checkpoints (base + 1 % noise each) and a held-out set in ``directory``."""
    torch.manual_seed(0)
    base = mlp(args).state_dict()
    for i in range(args.k):
        state = {k: v + 0.01 * v.abs().mean() * torch.randn_like(v) for k, v in base.items()}
        soupkit.save_state_dict(state, directory / f"m{i:02d}.safetensors")
    x = torch.randn(args.examples, args.tokens, args.d_in)
    torch.save({"x": x, "y": torch.randint(0, args.classes, (args.examples,))}, directory / "heldout.pt")


def worker(args: argparse.Namespace) -> None:
    """One rank: the soup run; rank 0 writes the stats as JSON."""
    import torch.distributed as dist  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        dist.init_process_group(args.backend or ("nccl" if device.startswith("cuda") else "gloo"))
    data = torch.load(Path(args.work) / "heldout.pt")
    loader = DataLoader(TensorDataset(data["x"], data["y"]), batch_size=args.batch_size)
    paths = sorted(Path(args.work).glob("m*.safetensors"))
    model = mlp(args)
    # one-time costs of a fresh process, before the clock: torch.optim's first optimiser imports torch._dynamo
    # (seconds), and so does the first functional_call
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    torch.func.functional_call(model, dict(model.state_dict()), (data["x"][:1],))
    cpu = time.process_time()
    r = soupkit.make_soup("mehl+", model, paths, loader, device=device, progress=False, epochs=args.epochs,
                          model_batch_size=args.b, parallel=args.mode if world > 1 else None, check_basin=False)
    cpu = time.process_time() - cpu  # this process's CPU seconds: what wall time is when it has a core to itself
    cpus = [cpu] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(cpus, cpu)
    if world == 1 or dist.get_rank() == 0:
        stats = {k: v for k, v in r.stats.items() if not isinstance(v, dict)}
        stats["cpu_seconds_per_epoch_per_rank"] = [c / r.stats["epochs"] for c in cpus]
        stats["model_mb"] = sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2**20
        Path(args.record).write_text(json.dumps(stats))
    if world > 1:
        dist.destroy_process_group()


def launch(args: argparse.Namespace, nproc: int, mode: str, record: Path) -> dict:
    """Run the worker in fresh process(es); its stats."""
    own = [__file__, "--worker", "--mode", mode, "--record", str(record), *sys.argv[1:]]
    if nproc == 1:
        cmd = [sys.executable, *own]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(port), *own]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return json.loads(record.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=8, help="models in the pool")
    p.add_argument("--b", type=int, default=4, help="models per block (model_batch_size)")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--tokens", type=int, default=8, help="tokens per example")
    p.add_argument("--examples", type=int, default=256, help="held-out examples")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--epochs", type=float, default=1.0, help="inner epochs per block")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend")
    p.add_argument("--work", help="folder for the pool (default: a temporary one)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="data", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    before = f"{os.getloadavg()[0]:.2f}"  # other jobs on the machine take cores from the runs
    with tempfile.TemporaryDirectory() as tmp:
        if args.work is None:
            args.work = tmp
            sys.argv += ["--work", tmp]
        write_inputs(Path(args.work), args)
        runs = [(1, "single")] + [(args.nproc, mode) for mode in ("data", "model")]
        rows = []
        for n, mode in runs:
            tries = [launch(args, n, mode, Path(tmp) / f"{n}-{mode}.json") for _ in range(args.repeats)]
            best = min(tries, key=lambda s: s["seconds_total"])
            best["cpu_seconds_per_epoch_per_rank"] = min((t["cpu_seconds_per_epoch_per_rank"] for t in tries), key=max)
            for key in ("peak_memory_bytes_per_rank", "peak_memory_bytes"):
                if key in best:
                    best[key] = max((t[key] for t in tries), key=lambda v: max(v) if isinstance(v, list) else v)
            rows.append((n, mode, best))
    mb = rows[0][2]["model_mb"]
    print(f"MEHL-Soup+  K={args.k}  b={args.b}  model {mb:.1f} MiB  held-out {args.examples} × {args.tokens} tokens "
          f"(batch {args.batch_size})"
          f"  {args.epochs:g} epoch/block  {args.threads} thread(s)/process  device {args.device}")
    print(f"load average before: {before}, after: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} CPUs)")
    print(f"{'processes':>9} {'mode':>7} {'s/epoch':>8} {'CPU s/epoch per rank':>21} {'peak MiB per rank':>18} "
          f"{'models held per rank':>21}")
    for n, mode, s in rows:
        peaks = s.get("peak_memory_bytes_per_rank", [s["peak_memory_bytes"]])
        held = s.get("max_resident_models_per_rank", [s["max_resident_models"]])
        cpu = " / ".join(f"{c:.2f}" for c in s["cpu_seconds_per_epoch_per_rank"])
        print(f"{n:>9} {mode:>7} {s['seconds_per_epoch']:>8.2f} {cpu:>21} "
              f"{' / '.join(f'{b / 2**20:.0f}' for b in peaks):>18} {' / '.join(map(str, held)):>21}")


if __name__ == "__main__":
    main()
