"""MEHL-Soup(+) grown with the sweep against rebuilt from scratch (notebook 12).

Models arrive in zoo order. At each size K_j (default 4, 8, 16, 32) the study builds the soup twice:

* ``scratch``: the method on the first K_j models, as a fresh run;
* ``grown``: the grown soup of size K_{j-1} extended with models K_{j-1}..K_j − 1 (``warm_start=`` the previous
  run's saved result, ``soupkit/methods/warm_start.py``: only the new models' blocks are trained). At the first
  size there is nothing to grow from: the grown record is a copy of the scratch one (``same_as``).

b is ``min(model_batch_size, K_j)`` for both (``main_table_options``: b above K is one block of all K). Every
run writes ``<out_dir>/<mode>_<K>.json`` (record), its per-image test predictions beside it and its result in
``<out_dir>/<mode>_<K>/`` (the next size grows from it); a record already there with status ``ok`` (and its
result) is not run again, so a re-run only does what is missing. :func:`growing_table` reads them back.

    growing_study("outputs/zoo", "outputs/growing", sizes=(4, 8, 16, 32))
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from soupkit.errors import GrowingError
from soupkit.experiments.results import with_test_intervals, write_csv
from soupkit.experiments.run import (RunSpec, main_table_options, predictions_path, read_correct, run_isolated,
                                     run_method)
from soupkit.experiments.stats import paired_difference
from soupkit.methods.registry import METHODS
from soupkit.zoo.sources import open_zoo

__all__ = ["MODES", "record_path", "result_dir", "is_done", "growing_specs", "growing_study",
           "growing_table"]

MODES = ("scratch", "grown")
# only the blockwise methods can be grown (warm_start is MEHL's: blocks of b models, the new ones first)
_GROWABLE_FAMILY = "mehl"


def record_path(out_dir: str | os.PathLike, mode: str, size: int) -> Path:
    """``<out_dir>/<mode>_<size>.json``."""
    return Path(out_dir) / f"{mode}_{size}.json"


def result_dir(out_dir: str | os.PathLike, mode: str, size: int) -> Path:
    """``<out_dir>/<mode>_<size>/``: the saved SoupResult the next size grows from."""
    return Path(out_dir) / f"{mode}_{size}"


def is_done(out_dir: str | os.PathLike, mode: str, size: int) -> bool:
    """A record with status ``ok``, its predictions and its saved result are there (resume skips the run)."""
    path = record_path(out_dir, mode, size)
    if not path.is_file() or not predictions_path(path).is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False  # a half-written record (atomic writes make this rare): run again
    return record.get("status") == "ok" and (result_dir(out_dir, mode, size) / "result.json").is_file()


def _check_sizes(sizes: Sequence[int], k: int | None = None) -> list[int]:
    out = sorted({int(s) if k is None else min(int(s), k) for s in sizes})
    if not out or out[0] < 2:
        raise GrowingError(f"sizes {list(sizes)}: a soup needs at least 2 models; give e.g. 4,8,16,32")
    return out


def growing_specs(zoo_dir: str | os.PathLike, out_dir: str | os.PathLike, sizes: Sequence[int],
                  method: str = "mehl+", model_batch_size: int | None = 8,
                  **spec_fields: Any) -> list[tuple[int, str, RunSpec | None]]:
    """``(size, mode, spec)`` in run order; spec None for the grown record of the first size (a copy of the
    scratch one). ``spec_fields``: other :class:`RunSpec` fields (``heldout_size``, ``seed``, ``device``...)."""
    if method not in METHODS or METHODS[method].family != _GROWABLE_FAMILY:
        growable = [m for m in METHODS if METHODS[m].family == _GROWABLE_FAMILY]
        raise GrowingError(f"method {method!r} cannot be grown; warm starts are MEHL-Soup's: {', '.join(growable)}")
    sizes = _check_sizes(sizes)
    out: list[tuple[int, str, RunSpec | None]] = []
    for j, k in enumerate(sizes):
        options = main_table_options(method, num_models=k, model_batch_size=model_batch_size)
        for mode in MODES:
            if mode == "grown" and j == 0:
                out.append((k, mode, None))
                continue
            if mode == "grown":
                # a path, not a SoupResult: RunSpec options are JSON scalars (they cross to the subprocess)
                options = {**options, "warm_start": str(result_dir(out_dir, "grown", sizes[j - 1]))}
            out.append((k, mode, RunSpec(zoo_dir=str(zoo_dir), method=method, record=str(record_path(out_dir, mode, k)),
                                         save_dir=str(result_dir(out_dir, mode, k)), models=tuple(range(k)),
                                         options=options, **spec_fields)))
    return out


def _copy_start(out_dir: Path, size: int) -> None:
    """The grown run at the first size is the scratch run: its record (marked ``same_as``), predictions, result."""
    source = record_path(out_dir, "scratch", size)
    record = {**json.loads(source.read_text()), "mode": "grown", "same_as": source.name}
    target = record_path(out_dir, "grown", size)
    shutil.copyfile(predictions_path(source), predictions_path(target))
    shutil.copytree(result_dir(out_dir, "scratch", size), result_dir(out_dir, "grown", size), dirs_exist_ok=True)
    target.write_text(json.dumps(record, indent=1, sort_keys=True, default=str))


def growing_study(zoo_dir: str | os.PathLike, out_dir: str | os.PathLike, sizes: Sequence[int] = (4, 8, 16, 32),
                  method: str = "mehl+", heldout_size: int | None = 2000, model_batch_size: int | None = 8,
                  seed: int = 0, device: str = "cpu", isolate: bool = True, progress: bool = False,
                  runner: Callable[[RunSpec], dict[str, Any]] | None = None) -> pd.DataFrame:
    """Build ``method`` from scratch and grown at each size (module docstring); returns :func:`growing_table`
    and writes it to ``<out_dir>/records.csv``.

    Args:
        sizes: numbers of models, the first ones of the zoo (values above the zoo's K become K).
        isolate: each run in a fresh process (honest peak memory; ``run_isolated``).
        runner: run one spec and return its record (default: ``run_isolated`` / ``run_method``); for tests.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = len(open_zoo(zoo_dir).records)
    sizes = _check_sizes(sizes, k)
    run = runner or (run_isolated if isolate else (lambda spec: run_method(spec, progress)))
    for size, mode, spec in growing_specs(zoo_dir, out, sizes, method, model_batch_size, heldout_size=heldout_size,
                                          seed=seed, device=device):
        if is_done(out, mode, size):
            continue
        if spec is None:
            _copy_start(out, size)
            continue
        record = run(spec)
        if record.get("status") != "ok":
            # a grown step needs the previous result: stop rather than grow from nothing
            raise GrowingError(f"{mode} run at K={size} ended with status {record.get('status')!r} "
                               f"({record.get('note', '')}); see {spec.record}")
    table = growing_table(out, sizes)
    write_csv(table, out / "records.csv")
    return table


def growing_table(out_dir: str | os.PathLike, sizes: Sequence[int], level: float = 0.95) -> pd.DataFrame:
    """One row per size and mode from the records in ``out_dir``: accuracies (fractions) with the test interval,
    ``seconds`` (this run's construction), ``cumulative_seconds`` (grown: the first scratch run plus every
    extension up to this size; scratch: its own), ``peak_memory_mb``, and on the grown rows ``difference`` =
    grown − scratch at that size with its paired-bootstrap interval (``difference_low`` / ``difference_high``)."""
    rows = []
    total = 0.0
    for size in _check_sizes(sizes):
        for mode in MODES:
            path = record_path(out_dir, mode, size)
            record = json.loads(path.read_text())
            seconds = float(record.get("seconds_total") or 0.0)
            if mode == "grown":
                total += seconds
            peak = record.get("peak_memory_bytes")
            rows.append({"size": size, "mode": mode, "method": record["method"], "status": record.get("status"),
                         "test_accuracy": record.get("test_accuracy"), "heldout_accuracy": record.get("heldout_accuracy"),
                         "seconds": seconds, "cumulative_seconds": total if mode == "grown" else seconds,
                         "peak_memory_mb": peak / 2 ** 20 if peak is not None else np.nan,
                         "record_path": str(path)})
    table = with_test_intervals(rows, level=level)
    diffs = {"difference": [], "difference_low": [], "difference_high": []}
    for _, row in table.iterrows():
        if row["mode"] != "grown":
            values = (np.nan, np.nan, np.nan)
        else:
            d = paired_difference(read_correct(row["record_path"]),
                                  read_correct(record_path(out_dir, "scratch", row["size"])), level=level)
            values = (d.estimate, d.low, d.high)
        for key, value in zip(diffs, values):
            diffs[key].append(value)
    return table.assign(**diffs)
