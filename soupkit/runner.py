"""Execute the paper's notebooks with papermill, in dependency order, at a preset scale.

    python -m soupkit.runner --preset embedded --out outputs          # what `make reproduce` runs
    python -m soupkit.runner --preset smoke --out outputs/smoke --only 02_main_table

A preset is ``presets/<name>.yaml``::

    description: one line
    common: {num_models: 32}           # given to every notebook that declares the parameter
    notebooks:
      02_main_table: {heldout_size: 1000}

Only parameters a notebook declares in its ``parameters`` cell are passed to it. Executed notebooks go to
``<out>/notebooks/``; the notebooks write their CSV/JSON under ``<out>``, and figures under ``figures/`` for
the embedded preset (the committed ones) or ``<out>/figures/`` for any other.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["NOTEBOOKS", "load_preset", "run_notebooks", "main"]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
PRESET_DIR = ROOT / "presets"
# dependency order: the zoo first, then everything that reads it
NOTEBOOKS = [
    "01_zoo", "02_main_table", "03_larger_model", "04_top_models", "05_coefficients", "06_finetuning_cost",
    "07_ablations", "08_heldout_size", "09_resnet",
]


def load_preset(name_or_path: str) -> dict[str, Any]:
    """Read a preset by name (``presets/<name>.yaml``) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"preset {name_or_path!r} not found (known presets: {known})")
    preset = yaml.safe_load(path.read_text()) or {}
    extra = sorted(set(preset) - {"description", "common", "notebooks"})
    if extra:
        raise ValueError(f"{path} is not a runner preset (unexpected keys {extra[:3]}...): a runner preset has "
                         "'description', 'common' and 'notebooks'; see presets/README.md")
    preset.setdefault("common", {})
    preset.setdefault("notebooks", {})
    return preset


def _declared_parameters(path: Path) -> set[str]:
    import papermill  # noqa: PLC0415  (heavy import, only when running notebooks)

    return set(papermill.inspect_notebook(str(path)))


def _commit_copy(executed: Path, source: Path) -> None:
    """Copy an executed notebook over its source, without papermill's record of this machine's paths."""
    import nbformat  # noqa: PLC0415

    nb = nbformat.read(executed, as_version=4)
    record = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if key in record:
            record[key] = f"notebooks/{source.name}"
    nbformat.write(nb, source)


def run_notebooks(preset: str = "embedded", out: str | os.PathLike = "outputs", only: Sequence[str] | None = None,
                  update_committed: bool = False, kernel: str = "python3") -> list[tuple[str, float]]:
    """Execute the notebooks of ``preset`` in order; returns ``[(name, seconds)]``.

    Args:
        preset: preset name or YAML path.
        out: output folder (CSV/JSON records, executed notebooks).
        only: names of the notebooks to run (default: all that exist, in dependency order).
        update_committed: copy each executed notebook back over ``notebooks/<name>.ipynb`` (to refresh the
            committed outputs that nbval checks).
    """
    import papermill  # noqa: PLC0415

    spec = load_preset(preset)
    out = Path(out).resolve()
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    figures = ROOT / "figures" if Path(preset).stem == "embedded" else out / "figures"
    names = [n for n in NOTEBOOKS if (NOTEBOOK_DIR / f"{n}.ipynb").exists()]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown notebook(s) {unknown}; available: {names}")
        names = [n for n in names if n in only]
    timings = []
    for k, name in enumerate(names, 1):
        source = NOTEBOOK_DIR / f"{name}.ipynb"
        params = {**spec["common"], **(spec["notebooks"].get(name) or {})}
        # a path relative to the notebooks folder, so executed notebooks never carry this machine's paths
        params["out_dir"] = os.path.relpath(out, NOTEBOOK_DIR)
        # the committed figures/ are those of the embedded default; other scales draw theirs under <out>
        params["figures_dir"] = os.path.relpath(figures, NOTEBOOK_DIR)
        declared = _declared_parameters(source)
        params = {key: value for key, value in params.items() if key in declared}
        target = out / "notebooks" / f"{name}.ipynb"
        print(f"[{k}/{len(names)}] {name} ({preset}) ...", flush=True)
        start = time.perf_counter()
        papermill.execute_notebook(str(source), str(target), parameters=params, cwd=str(NOTEBOOK_DIR),
                                   kernel_name=kernel, progress_bar=False)
        seconds = time.perf_counter() - start
        timings.append((name, seconds))
        print(f"[{k}/{len(names)}] {name} done in {seconds:.0f} s", flush=True)
        if update_committed:
            _commit_copy(target, source)
    total = sum(s for _, s in timings)
    print(f"all {len(timings)} notebooks done in {total:.0f} s; executed copies in {out / 'notebooks'}")
    return timings


def main(argv: Sequence[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="embedded", help="preset name (presets/<name>.yaml) or path")
    parser.add_argument("--out", default="outputs", help="output folder")
    parser.add_argument("--only", nargs="*", help="notebook names to run (default: all)")
    parser.add_argument("--update-committed", action="store_true",
                        help="copy executed notebooks back into notebooks/ (refreshes committed outputs)")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)
    return run_notebooks(args.preset, args.out, args.only, args.update_committed, args.kernel)


if __name__ == "__main__":
    main(sys.argv[1:])
