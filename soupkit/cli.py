"""``python -m soupkit``: one soup method on a pool of checkpoints, in one process or under ``torchrun``.

    python -m soupkit mehl+ --zoo outputs/zoo --out runs/mehl+
    torchrun --nproc-per-node 4 -m soupkit mehl+ --zoo outputs/zoo --out runs/mehl+ --parallel model
    python -m soupkit learned+ --arch ViT-B-32-quickgelu --pool 'checkpoints/model-soups/model_*.pt' \\
        --data imagenet --data-root data/imagenet --split-file splits/imagenet_heldout.json --out runs/learned+
    python -m soupkit diagnose --zoo outputs/zoo      # or --pool FOLDER: duplicates and outliers, by file

The architecture comes from an embedded zoo (``--zoo``; its files are the pool unless ``--pool`` is given)
or from open_clip (``--arch``, model-soups layout, with ``--data``). Rank 0 writes ``--out`` (the
:class:`SoupResult`: soup, coefficients, stats with the test accuracy) and shows the progress bar.

On a zoo every method runs with notebook 02's settings (``config.MAIN_TABLE_SETTINGS``: 2000 held-out
images, batches of 128, its learning rates, epochs and b), so ``python -m soupkit mehl+ --zoo outputs/zoo``
builds the soup of notebook 02's MEHL-Soup+ row; ``--option`` and the flags change them. Accuracies are printed
in percent with two decimals, as the notebooks' tables. Argument errors are one line, exit status 2.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from soupkit.config import MAIN_TABLE_SETTINGS, SoupConfig, parse_dtype
from soupkit.engine.batches import make_loader
from soupkit.errors import MissingPretrainedError, OneLineArgumentParser, OptionError, SoupkitError
from soupkit.methods.registry import METHODS, config_for, make_soup
from soupkit.pool.checkpoint_pool import CheckpointPool

__all__ = ["main", "entry", "parse_option", "expand_pool"]

_NUM_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100}
_NOT_OPTIONS = {"select_loader": "--select-fraction", "device": "--device", "parallel": "--parallel",
                "progress": "--no-progress", "seed": "--seed", "warm_start": "--extend"}


def parse_option(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``, the value an int, float, bool, None, torch dtype or string.

    >>> parse_option("lr=0.02"), parse_option("prefetch=true"), parse_option("layer_grouping=module")
    (('lr', 0.02), ('prefetch', True), ('layer_grouping', 'module'))
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, low = key.strip(), raw.strip().lower()
    if key == "dtype":
        try:  # the one dtype parser (bf16 / fp16 / fp32 or a torch dtype's name)
            return key, parse_dtype(raw.strip(), "dtype")
        except OptionError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    if low in ("true", "false"):
        return key, low == "true"
    if low in ("none", "null"):
        return key, None
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            pass
    return key, raw


def expand_pool(patterns: Sequence[str], list_file: str | None = None) -> list[Path]:
    """Checkpoint paths from paths/globs (each glob sorted) and a list file (one path a line, ``#`` comments,
    relative to the list's folder), in that order."""
    paths: list[Path] = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found and not glob.has_magic(pattern):
            found = [pattern]  # a plain path: let the pool name it if it is missing
        if not found:
            raise FileNotFoundError(f"--pool {pattern!r} matches no file")
        paths += [Path(p) for p in found]
    if list_file is not None:
        base = Path(list_file).parent
        for line in Path(list_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                paths.append(Path(line) if Path(line).is_absolute() else base / line)
    return paths


def _method(text: str) -> str:
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a method; choose from {', '.join(METHODS)}")
    return text


def _zoo_error(zoo: str) -> str | None:
    """Why ``--zoo`` is not a zoo folder (None if it is one)."""
    path = Path(zoo)
    if not path.is_dir():
        return f"--zoo {zoo}: no such folder; build the zoo with notebooks/01_zoo.ipynb (outputs/zoo) or " \
               f"python -m soupkit.zoo --out {zoo}"
    if not any((path / name).is_file() for name in ("zoo.json", "source.json")):
        return f"--zoo {zoo}: not a zoo (no zoo.json or source.json in it); build it with notebooks/01_zoo.ipynb " \
               f"or python -m soupkit.zoo --out {zoo}"
    return None


def _parser() -> argparse.ArgumentParser:
    options = sorted(name for name in SoupConfig.option_names() if name not in _NOT_OPTIONS)
    p = OneLineArgumentParser(prog="python -m soupkit", description="Run one soup method on a pool of "
                "checkpoints, in one process or on every rank of torchrun. On --zoo, with notebook 02's settings.",
                epilog="Keys of --option (see soupkit.config.SoupConfig): " + ", ".join(options))
    p.add_argument("method", type=_method, metavar="METHOD", help="one of " + ", ".join(METHODS))
    p.add_argument("--out", required=True, help="folder for soup.safetensors, coefficients.safetensors, result.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--zoo", help="embedded zoo directory (soupkit.zoo): architecture, data and default pool")
    src.add_argument("--arch", help="open_clip architecture of model-soups-style checkpoints, e.g. ViT-B-32-quickgelu")
    p.add_argument("--pool", nargs="+", default=[], metavar="PATH_OR_GLOB", help=".safetensors/.pt checkpoints")
    p.add_argument("--pool-list", help="text file with one checkpoint path a line")
    p.add_argument("--pretrained", help="the checkpoint the fine-tunes started from (θ_0), which model_stock and "
                   "task_arithmetic need (default on --zoo: the zoo's own, e.g. backbone.safetensors)")
    p.add_argument("--data", choices=sorted(_NUM_CLASSES), help="dataset of --arch checkpoints")
    p.add_argument("--data-root", help="ImageNet folders or the CIFAR python files (--arch)")
    p.add_argument("--split-file", help="held-out split JSON, created on first use (--arch; default "
                   "splits/<data>_heldout.json)")
    p.add_argument("--num-classes", type=int, help="classifier classes (--arch; default from --data)")
    p.add_argument("--heldout-size", type=int, help="zoo: use this many held-out images (default "
                   f"{MAIN_TABLE_SETTINGS['heldout_size']}, as notebook 02; 0: all)")
    p.add_argument("--select-fraction", type=float, default=0.0, help="zoo: part of the held-out set kept "
                   "for early stopping of learned soups")
    p.add_argument("--batch-size", type=int, default=128, help="global held-out batch (all ranks together)")
    p.add_argument("--eval-batch-size", type=int, help="test / held-out evaluation batch (default "
                   f"{MAIN_TABLE_SETTINGS['eval_batch_size']} on a zoo, as notebook 02; 256 with --arch)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers per rank (--arch)")
    p.add_argument("--device", help="default: cuda:<LOCAL_RANK> if CUDA is available, else cpu")
    p.add_argument("--parallel", choices=["data", "model"], default="data",
                   help="under torchrun: split every batch (data) or each block's models (model; hl/mehl)")
    p.add_argument("--backend", help="torch.distributed backend (default nccl on CUDA, else gloo)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a collective waits for a peer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                   help="a SoupConfig option (repeatable), e.g. model_batch_size=18 clip_grad_norm=1")
    p.add_argument("--extend", metavar="RUN_DIR", help="mehl/mehl+/mehl+released: grow this finished result (its "
                   "run_dir, or the --out of an earlier run) with the models the pool lists after its own; "
                   "passes over the new models: --option extend_passes=N")
    p.add_argument("--no-eval", action="store_true", help="skip the test accuracy")
    p.add_argument("--no-progress", action="store_true")
    return p


def _options(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict[str, Any]:
    options = dict(args.option)
    for key, flag in _NOT_OPTIONS.items():
        if key in options:
            p.error(f"--option {key}=...: use {flag}")
    if args.extend is not None:
        if not METHODS[args.method].extendable:
            p.error(f"--extend grows a MEHL-Soup(+) result: use mehl, mehl+ or mehl+released, not {args.method}")
        if not Path(args.extend).is_dir():
            p.error(f"--extend {args.extend}: no such folder (a run_dir or the --out folder of an earlier run)")
        options["warm_start"] = args.extend
    try:
        config_for(args.method, **options)  # unknown or invalid options fail now, not after loading
    except (TypeError, ValueError) as err:
        p.error(str(err))
    return options


def _init_distributed(args: argparse.Namespace) -> tuple[str, int, int]:
    """``(device, rank, world_size)``; joins the process group that ``torchrun`` describes in the environment
    (or uses the caller's, if one is initialised)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if dist.is_available() and dist.is_initialized():
        return device, dist.get_rank(), dist.get_world_size()
    if world == 1:
        return device, 0, 1
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    backend = args.backend or ("nccl" if torch.device(device).type == "cuda" else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    return device, dist.get_rank(), dist.get_world_size()


def _zoo_inputs(args: argparse.Namespace, pool_paths: list[Path]) -> tuple:
    from soupkit.zoo.sources import open_zoo  # noqa: PLC0415  (data files: only for zoo runs)

    zoo = open_zoo(args.zoo)
    heldout = MAIN_TABLE_SETTINGS["heldout_size"] if args.heldout_size is None else (args.heldout_size or None)
    loaders = zoo.loaders(heldout, args.batch_size, args.eval_batch_size or MAIN_TABLE_SETTINGS["eval_batch_size"],
                          args.select_fraction, args.seed)
    pretrained = args.pretrained or zoo.pretrained_path  # θ_0 for model_stock / task_arithmetic
    return zoo.make_model(), CheckpointPool(pool_paths or zoo.paths, pretrained=pretrained), loaders["learn"], \
        loaders["select"], loaders["test"]


def _arch_inputs(args: argparse.Namespace, pool_paths: list[Path], rank: int, world: int) -> tuple:
    from soupkit.zoo import realdata  # noqa: PLC0415  (torchvision, open_clip: only for --arch runs)
    from soupkit.zoo.clip import TEXT_LEFTOVER_KEYS, build_model_soups_model, preprocess_config  # noqa: PLC0415

    pool = CheckpointPool(pool_paths, pretrained=args.pretrained)
    keep = any(k in pool.spec for k in TEXT_LEFTOVER_KEYS)  # unconverted model-soups files hold them
    model = build_model_soups_model(args.num_classes or _NUM_CLASSES[args.data], args.arch,
                                    keep_text_leftovers=keep)
    transform = realdata.clip_transform(preprocess_config(model))
    split_file = args.split_file or f"splits/{args.data}_heldout.json"
    if rank == 0:  # rank 0 writes a missing split file before the others read it
        splits = realdata.dataset_splits(args.data, args.data_root, transform, split_file, seed=args.seed)
    if world > 1:
        dist.barrier()
        if rank != 0:
            splits = realdata.dataset_splits(args.data, args.data_root, transform, split_file, seed=args.seed)
    learn = make_loader(splits.heldout, args.batch_size, shuffle=True, seed=args.seed, num_workers=args.workers)
    test = make_loader(splits.test, args.eval_batch_size or 256, num_workers=args.workers)
    return model, pool, learn, None, test


def run(args: argparse.Namespace, options: dict[str, Any], device: str, rank: int, world: int,
        command: Sequence[str] = ()) -> Path | None:
    """Build the inputs, run ``make_soup`` on every rank, evaluate and save on rank 0; the output directory."""
    pool_paths = expand_pool(args.pool, args.pool_list)
    if args.zoo:
        model, pool, learn, select, test = _zoo_inputs(args, pool_paths)
        from soupkit.experiments.run import main_table_options  # noqa: PLC0415

        # notebook 02's options for this method (one function for both), then the user's --option values
        options = {**main_table_options(args.method, len(pool)), **options}
    else:
        model, pool, learn, select, test = _arch_inputs(args, pool_paths, rank, world)
    options = {"progress": not args.no_progress, "seed": args.seed, "device": device,
               "parallel": args.parallel if world > 1 else None, **options}
    if select is not None and METHODS[args.method].learned:
        options["select_loader"] = select
    result = make_soup(args.method, model, pool, learn, **options)
    if rank != 0:
        return None
    if not args.no_eval and test is not None:
        from soupkit.methods.result import evaluate  # noqa: PLC0415

        result.stats["test_accuracy"] = evaluate(model, result, test, device)
    result.stats["command"] = list(command)
    out = result.save(args.out)
    acc = result.stats.get("test_accuracy")
    print(f"{args.method}: K={len(pool)}, {world} rank(s) ({args.parallel if world > 1 else 'single'}), "
          f"{result.stats['seconds_total']:.1f} s" + (f", test accuracy {100 * acc:.2f} %" if acc is not None else "")
          + f" -> {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status (0).

    Argument errors exit with status 2 before anything is read. Inside an initialised process group (e.g.
    a caller's own) it runs on that group and leaves it open.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # python -m soupkit plan --zoo outputs/zoo --k 32 --b 8 ... (soupkit.experiments.plan)
        from soupkit.experiments.plan import main as plan_main  # noqa: PLC0415

        return plan_main(argv[1:])
    if argv[:1] == ["diagnose"]:  # python -m soupkit diagnose --zoo outputs/zoo (soupkit.pool.diagnostics)
        return _diagnose_main(argv[1:])
    p = _parser()
    args = p.parse_args(argv)
    if args.arch and not (args.pool or args.pool_list):
        p.error("--arch needs --pool or --pool-list")
    if args.arch and not (args.data and args.data_root):
        p.error("--arch needs --data and --data-root")
    options = _options(args, p)
    if args.zoo and _zoo_error(args.zoo):
        p.error(_zoo_error(args.zoo))
    if args.pool_list and not Path(args.pool_list).is_file():
        p.error(f"--pool-list {args.pool_list}: no such file")
    try:
        expand_pool(args.pool)
    except FileNotFoundError as err:
        p.error(str(err))
    owned = not (dist.is_available() and dist.is_initialized())  # a caller's process group stays open
    device, rank, world = _init_distributed(args)
    launcher = ["python"] if world == 1 else \
        ["torchrun", f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', world)}"]
    try:
        with warnings.catch_warnings():
            if rank != 0:  # every rank runs the same checks: rank 0's warnings are everyone's
                warnings.simplefilter("ignore")
            run(args, options, device, rank, world, [*launcher, "-m", "soupkit", *argv])
    except SoupkitError as err:
        if world > 1:  # every rank's own line: the launcher shows which one failed first
            print(f"soupkit: rank {rank}/{world} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            raise
        hint = " (here: --pretrained PATH)" if isinstance(err, MissingPretrainedError) else ""
        p.exit(1, f"{p.prog}: error: {err}{hint}\n")  # an input soupkit refuses: its sentence, not a traceback
    except BaseException as err:
        if world > 1:  # every rank's own line: the launcher shows which one failed first
            print(f"soupkit: rank {rank}/{world} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    if world > 1 and owned:
        dist.destroy_process_group()
    return 0


# ---- python -m soupkit diagnose ---------------------------------------------------------------------------
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")


def _diagnose_parser() -> argparse.ArgumentParser:
    from soupkit.pool.basin import BASIN_THRESHOLD  # noqa: PLC0415
    from soupkit.pool.diagnostics import FAR_RATIO, NEAR_RATIO  # noqa: PLC0415

    p = OneLineArgumentParser(prog="python -m soupkit diagnose", description="Before any soup is learned: the "
                              "pool's duplicate and near-duplicate checkpoints and those far outside the shared basin, "
                              "by file, one row per model (soupkit.pool.diagnostics).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--zoo", help="zoo directory (soupkit.zoo): its checkpoints, and its records for models with "
                     "identical hyper-parameters and accuracies")
    src.add_argument("--pool", nargs="+", metavar="PATH_OR_GLOB_OR_FOLDER",
                     help=".safetensors/.pt checkpoints, globs, or folders of them")
    src.add_argument("--pool-list", help="text file with one checkpoint path a line")
    p.add_argument("--near-ratio", type=float, default=NEAR_RATIO, help="pairs closer than this fraction of the "
                   f"median pairwise distance are near-duplicates (default {NEAR_RATIO:g})")
    p.add_argument("--far-ratio", type=float, default=FAR_RATIO, help="a model farther from the centre of the "
                   f"others than this multiple of their median distance to it is flagged (default {FAR_RATIO:g})")
    p.add_argument("--basin-threshold", type=float, default=BASIN_THRESHOLD, help="a cosine to the other models "
                   f"below it is outside the shared basin (default {BASIN_THRESHOLD:g})")
    p.add_argument("--device", default="cpu", help="where the Gram matrix is accumulated (reads stay on the host)")
    return p


def _diagnose_paths(patterns: Sequence[str]) -> list[Path]:
    """``--pool`` entries with each folder replaced by its checkpoint files (sorted)."""
    out: list[Path] = []
    for pattern in patterns:
        folder = Path(os.path.expanduser(pattern))
        if folder.is_dir():
            found = sorted(f for f in folder.iterdir() if f.suffix in _CHECKPOINT_SUFFIXES and f.is_file())
            if not found:
                raise FileNotFoundError(f"--pool {pattern}: the folder holds no .safetensors/.pt/.pth file")
            out += found
        else:
            out += expand_pool([pattern])
    return out


def _diagnose_main(argv: Sequence[str]) -> int:
    """``python -m soupkit diagnose``: print the pool's diagnostics table and summary; 0, or 1 for an input
    soupkit refuses (argument errors: 2). Flags are also warnings (``DuplicateCheckpointWarning``,
    ``SharedBasinWarning``) on stderr."""
    from soupkit.pool.diagnostics import diagnose, duplicate_records  # noqa: PLC0415

    p = _diagnose_parser()
    args = p.parse_args(list(argv))
    if args.zoo and _zoo_error(args.zoo):
        p.error(_zoo_error(args.zoo))
    if args.pool_list and not Path(args.pool_list).is_file():
        p.error(f"--pool-list {args.pool_list}: no such file")
    records: Sequence[dict] = ()
    try:
        if args.zoo:
            from soupkit.zoo.sources import open_zoo  # noqa: PLC0415

            zoo = open_zoo(args.zoo)
            paths, records = zoo.paths, zoo.records
        else:
            paths = _diagnose_paths(args.pool or []) + expand_pool([], args.pool_list)
        report = diagnose(CheckpointPool(paths), near_ratio=args.near_ratio, far_ratio=args.far_ratio,
                          basin_threshold=args.basin_threshold, device=args.device)
    except SoupkitError as err:  # an input soupkit refuses: its sentence, not a traceback
        p.exit(1, f"{p.prog}: error: {err}\n")
    except FileNotFoundError as err:  # a --pool glob that matches nothing
        p.error(str(err))
    print(report.format())
    for group in duplicate_records(records):
        print(f"records: identical hyper-parameters and accuracies: {', '.join(group)}")
    print(f"({report.stats['seconds']:.1f} s, {report.stats['blocks']} block(s) of at most "
          f"{report.stats['block_bytes'] / 2**20:.0f} MB)")
    return 0


def entry() -> int:
    """``python -m soupkit`` / the console script: :func:`main` with torchrun's error file (the failing rank's
    traceback in the launcher's "Root Cause" report)."""
    return record(main)()
