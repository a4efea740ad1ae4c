"""Run soup methods on a zoo and record the paper's table columns, each method in a fresh process.

A fresh process per method is what makes the peak-memory column honest on CPU: the resident-set high-water
mark, the allocator's caches and the models of an earlier method in the same process would all leak into
the next method's number.

    python -m soupkit.experiments.run '{"zoo_dir": "outputs/zoo", "method": "mehl+", "record": "out/mehl+.json"}'
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

import torch
from tqdm.auto import tqdm

from soupkit.config import MAIN_TABLE_SETTINGS
from soupkit.engine.evaluation import accuracy
from soupkit.errors import DivergenceError, MemoryCapExceeded, MissingInputError, MissingPretrainedError
from soupkit.io import atomic_write_json, atomic_write_text
from soupkit.methods.registry import METHODS, make_soup
from soupkit.methods.result import soup_logits
from soupkit.pool.checkpoint_pool import CheckpointPool
from soupkit.pool.diagnostics import diagnose, duplicate_records, record_name
from soupkit.runtime.numerics import numerics_info
from soupkit.runtime.progress import ENV as PROGRESS_ENV, report
from soupkit.zoo.base import BaseZoo
from soupkit.zoo.shifts import shift_predict
from soupkit.zoo.sources import open_zoo

__all__ = ["RunSpec", "NO_PRETRAINED", "main_table_options", "predictions_path", "write_predictions",
           "read_correct", "soup_options", "zoo_table", "zoo_diagnostics", "zoo_regime", "run_method", "run_isolated",
           "run_methods"]


@dataclass(frozen=True)
class RunSpec:
    """One soup run on a zoo (all fields are JSON scalars, so a spec crosses process boundaries).

    Attributes:
        zoo_dir: the zoo (``sources.prepare_zoo`` / ``soupkit.zoo.build_zoo`` output).
        method: a name of ``soupkit.METHODS``.
        record: JSON file the record is written to; ``save_dir`` (optional) receives the SoupResult.
        models: use only these zoo indices (e.g. to drop the top models); None = all.
        heldout_size: images of the held-out split used (a class-balanced prefix); None = all.
        select_fraction: part of those held out for early stopping of learned soups (0 = none).
        options: keyword options of ``make_soup`` (scalars).
        memory_cap_mb: stop the soup construction once it uses more than this many MB above the level at its
            start (``memory.MemoryCap``); the record then says ``status: "did not fit"`` (``"diverged"`` for a
            run stopped by a non-finite loss) with no accuracy, as
            the paper reports ">256GB". None: no cap. On CPU this needs the run on the main thread.
        device: where the soup is built and evaluated (``"cpu"``, ``"cuda"``).
        shifts: also evaluate the soup on each of the zoo's distribution-shift test sets (``zoo.shift_names()``):
            the record gains ``shift_<name>_accuracy`` / ``shift_<name>_images`` and per-image predictions
            ``<record>.shift-<name>.predictions.csv``.
    """

    zoo_dir: str
    method: str
    record: str
    save_dir: str | None = None
    models: tuple[int, ...] | None = None
    heldout_size: int | None = None
    select_fraction: float = MAIN_TABLE_SETTINGS["select_fraction"]
    batch_size: int = MAIN_TABLE_SETTINGS["batch_size"]
    eval_batch_size: int = MAIN_TABLE_SETTINGS["eval_batch_size"]
    seed: int = MAIN_TABLE_SETTINGS["seed"]
    options: dict[str, Any] = field(default_factory=dict)
    memory_cap_mb: float | None = None
    device: str = "cpu"
    shifts: bool = False


# the record status of a method that needs the pretrained model θ_0 on a zoo without one (no accuracy)
NO_PRETRAINED = "no pretrained model"

# learned methods of these registry families are AdamW on a hyperplane (they take weight decay); those of the
# blockwise family also take b, the models per block; any other learned method takes learned_lr and epochs
_HYPERPLANE_FAMILIES = ("hl", "mehl")
_BLOCKWISE_FAMILIES = ("mehl",)


def soup_options(method: str, *, learned_lr: float | None = None, hyperplane_lr: float | None = None,
                 weight_decay: float | None = None, epochs: float | None = None,
                 model_batch_size: int | None = None, **common: Any) -> dict[str, Any]:
    """``make_soup`` options for ``method`` from the scalar parameters notebooks expose.

    Only learned methods (``METHODS[method].learned``) take the learning settings; a setting left None is the
    method's default (``METHODS[method].defaults``), written out so the record names the value used.
    """
    opts: dict[str, Any] = dict(common)
    entry = METHODS.get(method)
    if entry is None or not entry.learned:
        return opts
    defaults = entry.defaults.algorithm

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    if entry.family in _HYPERPLANE_FAMILIES:
        opts.update(lr=given(hyperplane_lr, defaults.lr), weight_decay=given(weight_decay, defaults.weight_decay),
                    epochs=given(epochs, defaults.epochs))
        if entry.family in _BLOCKWISE_FAMILIES and model_batch_size is not None:
            opts["model_batch_size"] = model_batch_size
    else:
        opts.update(lr=given(learned_lr, defaults.lr), epochs=given(epochs, defaults.epochs))
    return opts


_LEARNING_KEYS = ("learned_lr", "hyperplane_lr", "weight_decay", "epochs", "model_batch_size")


def main_table_options(method: str, num_models: int | None = None, **overrides: Any) -> dict[str, Any]:
    """``make_soup`` options of ``method`` as notebook 02 runs it (:data:`MAIN_TABLE_SETTINGS` through
    :func:`soup_options`); ``overrides`` are ``soup_options`` keywords. ``model_batch_size`` is capped at
    ``num_models`` (b above K is one block of all K, and make_soup would warn)."""
    settings = {**{k: MAIN_TABLE_SETTINGS[k] for k in _LEARNING_KEYS}, **overrides}
    if num_models is not None and settings.get("model_batch_size") is not None:
        settings["model_batch_size"] = min(settings["model_batch_size"], num_models)
    return soup_options(method, **settings)


def zoo_table(zoo: BaseZoo, diagnostics: bool = False, device: str = "cpu") -> pd.DataFrame:
    """One row per fine-tune: index, hyper-parameters, held-out/test accuracy (fractions), fine-tune seconds.

    ``diagnostics``: also a ``diagnostics`` column, what :func:`zoo_diagnostics` flags about each model ("" when
    nothing): one streamed pass over the checkpoints (the Gram matrix on ``device``).
    """
    rows = [{"index": r["index"], **(r.get("hparams") or {}), "heldout_acc": r["heldout_acc"],
             "test_acc": r["test_acc"], "finetune_seconds": r.get("finetune_seconds")} for r in zoo.records]
    table = pd.DataFrame(rows)
    if diagnostics:
        table["diagnostics"] = zoo_diagnostics(zoo, device)
    return table


def zoo_diagnostics(zoo: BaseZoo, device: str = "cpu") -> list[str]:
    """Per model of the zoo, what ``soupkit.pool.diagnostics`` flags, ``"; "``-joined ("" when nothing): identical,
    near-duplicate, far or out-of-basin checkpoints (:func:`~soupkit.pool.diagnostics.diagnose`, which also warns)
    and records with identical hyper-parameters and accuracies (:func:`~soupkit.pool.diagnostics.duplicate_records`)."""
    flags = [list(f) for f in diagnose(CheckpointPool(zoo.paths), device=device).flags]
    position = {record_name(r, n): n for n, r in enumerate(zoo.records)}
    for group in duplicate_records(zoo.records):
        for name in group:
            flags[position[name]].append("same hyper-parameters and accuracies as "
                                         + ", ".join(other for other in group if other != name))
    return ["; ".join(f) for f in flags]


def zoo_regime(zoo: BaseZoo, uniform_test_accuracy: float) -> pd.Series:
    """Test accuracy (%) of the zoo's landmarks: linear probe (embedded zoos), worst / mean / best individual,
    the "best" baseline (best by held-out accuracy) and the uniform soup -- is the zoo in the paper's regime?"""
    models = zoo_table(zoo)
    rows = {}
    if zoo.linear_probe_accuracy is not None:
        rows["linear probe (start of every fine-tune)"] = zoo.linear_probe_accuracy
    rows.update({
        "worst individual": models.test_acc.min(),
        "mean individual": models.test_acc.mean(),
        "best individual (by test)": models.test_acc.max(),
        "best individual (by held-out, the 'best' baseline)": models.test_acc[models.heldout_acc.idxmax()],
        "uniform soup": uniform_test_accuracy,
    })
    return pd.Series(rows, name="test accuracy (%)").mul(100).round(2)


def predictions_path(record: str | os.PathLike, split: str = "test") -> Path:
    """Where the per-image predictions of the run whose record is ``record`` (``x.json``) live: on the test
    split ``x.predictions.csv``, on shift ``s`` (``split="shift-s"``) ``x.shift-s.predictions.csv``."""
    record = Path(record)
    return record.with_name(f"{record.stem}.predictions.csv" if split == "test" else
                            f"{record.stem}.{split}.predictions.csv")


def write_predictions(record: str | os.PathLike, labels: torch.Tensor, predicted: torch.Tensor,
                      split: str = "test") -> Path:
    """Write ``labels [N]`` and ``predicted [N]`` (the split's fixed order) beside ``record``, atomically."""
    lines = ["label,prediction"] + [f"{int(y)},{int(p)}" for y, p in zip(labels.tolist(), predicted.tolist())]
    return atomic_write_text(predictions_path(record, split), "\n".join(lines) + "\n")


def read_correct(record: str | os.PathLike, split: str = "test") -> "np.ndarray":
    """``[N]`` bool: which images of ``split`` (``"test"`` or ``"shift-<name>"``) the run of ``record``
    classified correctly (from its predictions file)."""
    import numpy as np  # noqa: PLC0415

    path = predictions_path(record, split)
    if not path.is_file():
        raise MissingInputError(f"no per-image predictions {path} for record {record}: rerun the method")
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    return table[:, 0] == table[:, 1]


def _report_done(spec: RunSpec, record: dict[str, Any], seconds: float) -> None:
    """One progress line for a finished run (``soupkit.runtime.progress``: on in notebooks, off elsewhere)."""
    acc = record.get("test_accuracy")
    report(f"{spec.method}: {record.get('status', 'ok')}" + (f", test accuracy {100 * acc:.2f} %" if acc is not None
           else "") + f", {seconds:.0f} s -> {spec.record}")


def run_method(spec: RunSpec, progress: bool = False) -> dict[str, Any]:
    """Run ``spec`` in this process; write and return its record (accuracies as fractions)."""
    started = time.perf_counter()
    record = _run_method(spec, progress)
    _report_done(spec, record, time.perf_counter() - started)
    return record


def _stop_workers(loaders: dict[str, Any]) -> None:
    """Stop the loaders' persistent DataLoader workers now. Left to the garbage collector, a loader can be
    collected inside a process forked later (the next run's workers) and print "can only test a child process"."""
    for loader in loaders.values():
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def _run_method(spec: RunSpec, progress: bool) -> dict[str, Any]:
    zoo = open_zoo(spec.zoo_dir)
    loaders = zoo.loaders(spec.heldout_size, spec.batch_size, spec.eval_batch_size, spec.select_fraction, spec.seed)
    try:
        return _run_on(spec, zoo, loaders, progress)
    finally:
        _stop_workers(loaders)


def _run_on(spec: RunSpec, zoo: Any, loaders: dict[str, Any], progress: bool) -> dict[str, Any]:
    indices = list(spec.models) if spec.models is not None else list(range(len(zoo.records)))
    pool = CheckpointPool([zoo.paths[i] for i in indices], pretrained=zoo.pretrained_path)
    model = zoo.make_model()
    options = {"progress": progress, "seed": spec.seed, "device": spec.device, **spec.options}
    if loaders["select"] is not None and METHODS[spec.method].learned:
        options["select_loader"] = loaders["select"]
    base = {k: v for k, v in asdict(spec).items() if k not in ("record", "save_dir")}
    if spec.memory_cap_mb:
        options["memory_cap_mb"] = spec.memory_cap_mb
    try:
        result = make_soup(spec.method, model, pool, loaders["learn"], **options)
    except (MemoryCapExceeded, torch.OutOfMemoryError) as err:
        # a run the machine (or the cap standing for a smaller one) cannot hold is a result, as the paper's ">256GB"
        seen = err.seen_bytes if isinstance(err, MemoryCapExceeded) else None
        record = {**base, "num_models": len(pool), "status": "did not fit", "test_accuracy": None,
                  "heldout_accuracy": None, "peak_memory_bytes": seen, "note": str(err).splitlines()[0]}
        atomic_write_json(spec.record, record)
        return record
    except (DivergenceError, MissingPretrainedError) as err:
        # a method whose coefficients run off to NaN/Inf on this zoo is a result too (no soup was written), and
        # so is one that needs θ_0 on a zoo that does not know it (an external zoo without `pretrained`)
        status = "diverged" if isinstance(err, DivergenceError) else NO_PRETRAINED
        record = {**base, "num_models": len(pool), "status": status, "test_accuracy": None,
                  "heldout_accuracy": None, "peak_memory_bytes": None, "note": str(err).splitlines()[0]}
        atomic_write_json(spec.record, record)
        return record
    test_logits, test_labels = soup_logits(model, result, loaders["test"], spec.device)
    write_predictions(spec.record, test_labels, test_logits.argmax(dim=1))
    record = {
        **base,
        "status": "ok",
        "num_models": len(pool),
        "test_accuracy": accuracy(test_logits, test_labels),
        "heldout_accuracy": accuracy(*soup_logits(model, result, loaders["heldout"], spec.device)),
        "test_images": len(test_labels),
        "predictions": predictions_path(spec.record).name,
        **{k: v for k, v in result.stats.items() if not isinstance(v, (list, dict))},
        **numerics_info(),
    }
    if spec.shifts:
        record.update(_shift_results(spec, zoo, model, result))
    if "chosen" in result.stats:
        record["chosen"] = [indices[i] for i in result.stats["chosen"]]
    if spec.save_dir:
        result.save(spec.save_dir)
    atomic_write_json(spec.record, record)
    return record


def _shift_results(spec: RunSpec, zoo: BaseZoo, model: torch.nn.Module, result: Any) -> dict[str, Any]:
    """Accuracy of ``result`` on each of the zoo's shifts (record fields); writes each shift's predictions."""
    out: dict[str, Any] = {}
    for name in zoo.shift_names():
        logits, labels = soup_logits(model, result, zoo.shift_loader(name, spec.eval_batch_size), spec.device)
        predicted = shift_predict(logits, zoo.shift_info(name))
        write_predictions(spec.record, labels, predicted, split=f"shift-{name}")
        out[f"shift_{name}_accuracy"] = int((predicted == labels.to(predicted.device)).sum()) / max(len(labels), 1)
        out[f"shift_{name}_images"] = len(labels)
    return out


def run_isolated(spec: RunSpec, timeout: float | None = None) -> dict[str, Any]:
    """:func:`run_method` in a fresh Python process (honest peak memory); returns the record it wrote."""
    payload = json.dumps(asdict(spec))
    started = time.perf_counter()
    # the child's own progress line would only land in the captured stderr: this process reports instead
    proc = subprocess.run([sys.executable, "-m", "soupkit.experiments.run", payload], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", PROGRESS_ENV: "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"{spec.method} failed in its subprocess (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    record = json.loads(Path(spec.record).read_text())
    _report_done(spec, record, time.perf_counter() - started)
    return record


def run_methods(zoo_dir: str | os.PathLike, out_dir: str | os.PathLike, methods: Sequence[str] | None = None,
                isolate: bool = True, progress: bool = True, options: dict[str, dict[str, Any]] | None = None,
                **spec_fields: Any) -> list[dict[str, Any]]:
    """Run each method on the zoo (fresh process each when ``isolate``), write ``<out_dir>/<method>.json`` and
    ``<out_dir>/<method>/`` (soup, coefficients), and return the records in order.

    Args:
        methods: names of ``soupkit.METHODS`` (default: all).
        options: per-method ``make_soup`` options, ``{method: {...}}``.
        **spec_fields: other :class:`RunSpec` fields shared by all runs (``heldout_size``, ``models``...).
    """
    methods = list(methods or METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    out = Path(out_dir)
    records = []
    for method in tqdm(methods, desc="soup methods", disable=not progress):
        spec = RunSpec(zoo_dir=str(zoo_dir), method=method, record=str(out / f"{method}.json"),
                       save_dir=str(out / method.replace("+", "_plus")), options=(options or {}).get(method, {}),
                       **spec_fields)
        records.append(run_isolated(spec) if isolate else run_method(spec))
    return records


def _spec_from_json(payload: str) -> RunSpec:
    raw = json.loads(payload)
    if raw.get("models") is not None:
        raw["models"] = tuple(raw["models"])
    return replace(RunSpec(raw.pop("zoo_dir"), raw.pop("method"), raw.pop("record")), **raw)


if __name__ == "__main__":
    run_method(_spec_from_json(sys.argv[1]))
