"""Do the pinned CPU numerics give the same bytes whatever kernels this CPU offers, and what do they cost?

Each setting runs in a fresh process (the variables are read when torch first dispatches): 20 AdamW steps of
the embedded zoo's ViT and of its ResNet (conv + BatchNorm) on fixed random data, one torch thread, then the
sha256 of every weight. "native" rows switch soupkit's pins off (``SOUPKIT_NUMERICS=native``) and set one
variable, to show that each changes the bytes; "pinned" rows keep the pins and vary what stands for another
processor here (MKL's instruction limit, threads in the environment): they must all give one hash. Timing:
the native and pinned processes alternate, ``--repeats`` times each, and the ratio of their median training
seconds is printed.

    python benchmarks/numerics.py                     # writes data/results/numerics_cpu.csv
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS: list[tuple[str, str, dict[str, str]]] = [
    ("native", "this CPU's own choice", {}),
    ("native", "ATEN_CPU_CAPABILITY=default", {"ATEN_CPU_CAPABILITY": "default"}),
    ("native", "ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}),
    ("native", "MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}),
    ("native", "ONEDNN_MAX_CPU_ISA=AVX", {"ONEDNN_MAX_CPU_ISA": "AVX"}),
    ("native", "ATEN default + MKL COMPATIBLE (no oneDNN pin)", {"ATEN_CPU_CAPABILITY": "default",
                                                                 "MKL_CBWR": "COMPATIBLE"}),
    ("pinned", "soupkit's pins", {}),
    ("pinned", "pins + MKL_ENABLE_INSTRUCTIONS=SSE4_2", {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}),
    ("pinned", "pins + MKL_ENABLE_INSTRUCTIONS=AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    ("pinned", "pins + OMP_NUM_THREADS=2", {"OMP_NUM_THREADS": "2"}),
]


def probe(steps: int = 20) -> dict:
    """Train both zoo architectures ``steps`` AdamW steps; return the weights' hash and the seconds."""
    import soupkit  # noqa: F401  (first: pins unless SOUPKIT_NUMERICS=native)
    import torch

    from soupkit.zoo.embedded_models import ResNetConfig, ViTConfig, build_classifier
    from soupkit.runtime.numerics import numerics_info

    torch.set_num_threads(1)
    digest = hashlib.sha256()
    start = time.perf_counter()
    losses = []
    for cfg in (ViTConfig(), ResNetConfig(width=8)):
        torch.manual_seed(0)
        model = build_classifier(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss.item())
        for tensor in model.state_dict().values():
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    seconds = time.perf_counter() - start
    return {"sha256": digest.hexdigest()[:16], "seconds": seconds, "last_losses": losses, **numerics_info()}


def run(mode: str, extra: dict[str, str], steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
                                                            "MKL_ENABLE_INSTRUCTIONS", "SOUPKIT_NUMERICS")}
    env.update(extra)
    if mode == "native":
        env["SOUPKIT_NUMERICS"] = "native"
    out = subprocess.run([sys.executable, __file__, "--probe", "--steps", str(steps)], env=env, check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timing runs of native and pinned, alternated")
    parser.add_argument("--out", default=str(ROOT / "data" / "results" / "numerics_cpu.csv"))
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.steps)))
        return
    import pandas as pd

    rows = []
    for mode, label, extra in SETTINGS:
        r = run(mode, extra, args.steps)
        rows.append({"numerics": mode, "setting": label, "cpu_capability": r["cpu_capability"],
                     "sha256": r["sha256"], "seconds": round(r["seconds"], 3)})
        print(f"{mode:7s} {label:48s} {r['cpu_capability']:8s} {r['sha256']}  {r['seconds']:.2f} s", flush=True)
    pinned = {r["sha256"] for r in rows if r["numerics"] == "pinned"}
    native = {r["sha256"] for r in rows if r["numerics"] == "native"}
    times: dict[str, list[float]] = {"native": [], "pinned": []}
    for _ in range(args.repeats):
        for mode in ("native", "pinned"):
            times[mode].append(run(mode, {}, args.steps)["seconds"])
    ratio = statistics.median(times["pinned"]) / statistics.median(times["native"])
    print(f"pinned settings: {len(pinned)} distinct hash(es) over {sum(r['numerics'] == 'pinned' for r in rows)} "
          f"settings; native settings: {len(native)} distinct hashes over "
          f"{sum(r['numerics'] == 'native' for r in rows)}")
    print(f"training time pinned / native (median of {args.repeats} alternated runs each): {ratio:.2f} "
          f"({statistics.median(times['pinned']):.2f} s vs {statistics.median(times['native']):.2f} s)")
    frame = pd.DataFrame(rows)
    frame["timing_ratio_pinned_over_native"] = round(ratio, 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
