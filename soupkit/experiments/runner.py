"""Execute the paper's notebooks with papermill, in dependency order, at a preset scale.

    python -m soupkit.experiments.runner --preset embedded --out outputs --jobs 2  # what `make reproduce` runs
    python -m soupkit.experiments.runner --preset smoke --out outputs/smoke --only 02_main_table
    python -m soupkit.experiments.runner --stages                                  # notebook groups that may run at once
    python -m soupkit.experiments.runner --nbval --notebooks /tmp/copy/notebooks --jobs 2   # what `make test` runs
    python -m soupkit.experiments.runner --preset paper --params 02_main_table > p.yaml   # one notebook: papermill -f p.yaml

A preset is ``presets/<name>.yaml``::

    description: one line
    common: {num_models: 32}           # given to every notebook that declares the parameter
    notebooks:
      02_main_table: {heldout_size: 1000}
    only: [10_seeds]                   # optional: run just these (default: every notebook but EXTRA)
    setup: soupkit.experiments.rehearsal:setup   # optional: called with the out folder before any notebook

A string value may hold ``{out_dir}``: the run's output folder, relative to ``notebooks/`` as every path there.
``setup`` makes inputs before the notebooks run (the rehearsal preset's stand-ins) and returns environment
variables for their kernels.

Only parameters a notebook declares in its ``parameters`` cell are passed to it. Executed notebooks go to
``<out>/notebooks/``; the notebooks write their CSV/JSON under ``<out>`` and their figures and tables under
``<out>/figures/``, so a run never changes a tracked file. ``--update-committed`` (the maintainers' refresh of
the committed results, for the presets in ``COMMITTED_FIGURES``) draws them under ``figures/`` instead and copies
each executed notebook over ``notebooks/``.
``EXTRA`` notebooks (10, the multi-seed study; 12, MEHL-Soup+ grown with the sweep) run only when a preset's ``only`` or ``--only`` names them.

The console shows one line per notebook started / done and, prefixed with the notebook's name, what its kernel
writes to stderr: soupkit's one line per finished soup (``soupkit.runtime.progress``) and any warning; its stdout
(tables, prints) stays in the executed notebook. By hand, ``papermill --stderr-file /dev/stderr`` shows the same
lines (``--log-output`` shows every output). ipykernel's "Kernel is running over TCP without encryption" warning is
dropped by the venv's kernel config (``jupyter/ipython_kernel_config.py``, installed by ``make setup``), for the
runner's kernels and papermill's by hand alike.

Committed notebooks (``--update-committed``) hold no injected-parameters cell and no path of this machine: the
preset and the parameters it gave are in ``metadata.soupkit``, and the kernelspec is pinned to what JupyterLab 4
writes (``KERNELSPEC``), so opening a committed notebook does not modify it.

With ``jobs > 1`` notebooks whose inputs are ready run side by side (``DEPENDS``: the zoo notebooks 01, 03 and
09 need nothing, 05 reads 02's soups, the rest read 01's zoo), each kernel with ``cpu_count // jobs`` torch
threads; results do not depend on it (zoos fix their own thread count). A failed notebook stops only the
notebooks that depend on it; the others finish, and the runner then raises with every failure.
``--nbval`` schedules ``make test``'s nbval checks the same way (one pytest process per notebook).
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from soupkit.errors import OneLineArgumentParser

__all__ = ["find_notebooks", "NOTEBOOKS", "EXTRA", "EXTRA_TABLES", "DEPENDS", "COMMITTED_FIGURES", "KERNELSPEC", "stages", "load_preset",
           "notebook_parameters", "pin_metadata", "run_in_order", "run_notebooks", "nbval_command", "check_notebooks",
           "main"]

# dependency order: the zoo first, then everything that reads it
NOTEBOOKS = [
    "01_zoo", "02_main_table", "03_larger_model", "04_top_models", "05_coefficients", "06_finetuning_cost",
    "07_ablations", "08_heldout_size", "09_resnet", "10_seeds", "11_claims", "12_growing",
]
# run only when named, by a preset's ``only`` list or by --only (longer than a default run; `make test`'s nbval
# groups, --stages, leave them out too)
EXTRA: tuple[str, ...] = ("10_seeds", "12_growing")
# the committed tables (globs in figures/) each EXTRA notebook writes: a rerun without them has none to compare
EXTRA_TABLES: dict[str, tuple[str, ...]] = {"10_seeds": ("seeds_*.csv",), "12_growing": ("growing.csv",)}
# what each notebook reads from another's outputs (all others build their own inputs)
DEPENDS: dict[str, tuple[str, ...]] = {
    "02_main_table": ("01_zoo",), "04_top_models": ("01_zoo",), "05_coefficients": ("02_main_table",),
    "06_finetuning_cost": ("01_zoo",), "07_ablations": ("01_zoo",), "08_heldout_size": ("01_zoo",),
    "10_seeds": (),  # builds its own zoos
    "12_growing": ("01_zoo",),
    # the claims read every study's records (and notebook 10's when they exist, e.g. committed before)
    "11_claims": ("02_main_table", "03_larger_model", "04_top_models", "05_coefficients", "06_finetuning_cost",
                  "07_ablations", "09_resnet"),
}
# presets whose results are the committed ones (figures/ and notebooks/, refreshed with --update-committed)
COMMITTED_FIGURES: tuple[str, ...] = ("embedded", "seeds")
# the kernelspec JupyterLab 4 writes on opening a notebook (ipykernel's display name): committed as is, so an
# autosave does not modify a committed notebook
KERNELSPEC: dict[str, str] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def find_notebooks(start: str | os.PathLike | None = None) -> Path:
    """The repository's ``notebooks/`` folder: ``start`` (default: the working folder) if it holds the notebooks,
    else ``notebooks/`` in it or in the nearest folder above it that has one. Presets are in ``../presets`` of
    it, the committed figures in ``../figures``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        for candidate in (folder, folder / "notebooks"):
            if (candidate / f"{NOTEBOOKS[0]}.ipynb").is_file():
                return candidate
    raise FileNotFoundError(f"no soupkit notebooks folder in or above {here}: run from the repository (or pass "
                            "--notebooks DIR)")


def _folder(notebooks: str | os.PathLike | None) -> Path:
    return Path(notebooks).resolve() if notebooks is not None else find_notebooks()


def stages(names: Sequence[str] | None = None) -> list[list[str]]:
    """``names`` (default: every notebook) in groups; each group needs only the groups before it."""
    todo = list(names or NOTEBOOKS)
    done: set[str] = set()
    groups = []
    while todo:
        ready = [n for n in todo if all(d in done or d not in todo for d in DEPENDS.get(n, ()))]
        groups.append(ready)
        done |= set(ready)
        todo = [n for n in todo if n not in done]
    return groups


def load_preset(name_or_path: str, notebooks: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a preset by name (``presets/<name>.yaml`` beside ``notebooks``, default :func:`find_notebooks`) or
    path."""
    path = Path(name_or_path)
    presets = _folder(notebooks).parent / "presets" if not path.suffix else path.parent
    if not path.suffix:
        path = presets / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in presets.glob("*.yaml"))
        raise FileNotFoundError(f"preset {name_or_path!r} not found (known presets: {known})")
    preset = yaml.safe_load(path.read_text()) or {}
    extra = sorted(set(preset) - {"description", "common", "notebooks", "only", "setup"})
    if extra:
        raise ValueError(f"{path} is not a runner preset (unexpected keys {extra[:3]}...): a runner preset has "
                         "'description', 'common', 'notebooks' and optionally 'only' and 'setup'; see "
                         "presets/README.md")
    preset.setdefault("common", {})
    preset.setdefault("notebooks", {})
    return preset


def _declared_parameters(path: Path) -> set[str]:
    import papermill  # noqa: PLC0415  (heavy import, only when running notebooks)

    return set(papermill.inspect_notebook(str(path)))


def _with_out_dir(params: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """``params`` with ``{out_dir}`` in string values replaced by ``out_dir``."""
    return {k: v.replace("{out_dir}", out_dir) if isinstance(v, str) else v for k, v in params.items()}


def _run_setup(target: str, out: Path) -> dict[str, str]:
    """Call a preset's ``setup`` (``module:function``) with the output folder; returns the environment it asks for."""
    import importlib  # noqa: PLC0415

    module, _, function = target.partition(":")
    if not function:
        raise ValueError(f"a preset's setup is 'module:function', got {target!r}")
    env = getattr(importlib.import_module(module), function)(out) or {}
    return {str(k): str(v) for k, v in env.items()}


def notebook_parameters(preset: str, name: str, notebooks: str | os.PathLike | None = None,
                        out: str | os.PathLike = "outputs") -> dict[str, Any]:
    """The parameters ``preset`` gives notebook ``name`` (its ``common`` and ``notebooks.<name>`` entries, only
    the names the notebook declares; ``{out_dir}`` is ``out``, relative to the notebooks folder): what to hand to
    ``papermill -f`` to run that notebook alone."""
    folder = _folder(notebooks)
    spec = load_preset(preset, folder)
    path = folder / f"{name}.ipynb"
    if not path.is_file():
        available = [n for n in NOTEBOOKS if (folder / f"{n}.ipynb").exists()]
        raise ValueError(f"unknown notebook {name!r}; available: {', '.join(available)}")
    declared = _declared_parameters(path)
    params = _with_out_dir({**spec["common"], **(spec["notebooks"].get(name) or {})},
                           os.path.relpath(Path(out).resolve(), folder))
    return {key: value for key, value in params.items() if key in declared}


def pin_metadata(metadata: dict[str, Any], preset: str | None = None,
                 parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """``metadata`` (a notebook's, changed in place and returned) with the pinned :data:`KERNELSPEC` and, when
    given, ``soupkit: {preset, parameters}``: the record of what a committed notebook was run with."""
    metadata["kernelspec"] = dict(KERNELSPEC)
    if parameters is not None:
        metadata["soupkit"] = {"preset": preset, "parameters": dict(parameters)}
    return metadata


def _commit_copy(executed: Path, source: Path, preset: str | None = None,
                 parameters: dict[str, Any] | None = None) -> None:
    """Copy an executed notebook over its source, without papermill's record of this machine's paths and
    without its injected-parameters cell (committed, it would override a user's edits of the parameters cell);
    the parameters it ran with go to ``metadata.soupkit`` instead, beside the pinned kernelspec."""
    import nbformat  # noqa: PLC0415

    nb = nbformat.read(executed, as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    record = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if key in record:
            record[key] = f"notebooks/{source.name}"
    pin_metadata(nb.metadata, preset, parameters)
    nbformat.write(nb, source)


class _Prefixed:
    """A text stream for papermill's ``stderr_file``: each line of a kernel's stderr to this process's stderr,
    prefixed with the notebook's name (several notebooks may run at once), whole lines only."""

    def __init__(self, name: str, lock: threading.Lock) -> None:
        self.name, self.lock, self.pending = name, lock, ""

    def write(self, text: str) -> int:
        self.pending += text.replace("\r", "\n")  # a tqdm bar's redraws become lines, not one growing line
        *lines, self.pending = self.pending.split("\n")
        with self.lock:
            for line in lines:
                if line.strip():
                    print(f"  {self.name}: {line}", file=sys.stderr, flush=True)
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.pending.strip():
            self.write("\n")


def _select(spec: dict[str, Any], only: Sequence[str] | None, folder: Path) -> list[str]:
    """The notebooks to run; ValueError naming an unknown one (before anything is created)."""
    names = [n for n in NOTEBOOKS if (folder / f"{n}.ipynb").exists()]
    only = only or spec.get("only")
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown notebook {unknown[0]!r}{hint}; available: {', '.join(names)}")
        return [n for n in names if n in only]
    return [n for n in names if n not in EXTRA]


def run_in_order(names: Sequence[str], execute: Callable[[int, str], float], jobs: int,
                 say: Callable[[str], None], failure_hint: Callable[[str], str] | None = None,
                 ) -> tuple[list[tuple[str, float]], dict[str, str]]:
    """Call ``execute(position, name)`` (returns seconds) for each of ``names``, ``jobs`` at once, each as soon as
    its inputs (``DEPENDS``, those among ``names``) are done; ready notebooks start in ``names``' order.

    No barrier between groups: a notebook waits only for its own inputs, so a core never idles while something
    is ready. A failed notebook skips only the notebooks that depend on it.

    Returns:
        ``[(name, seconds)]`` in finishing order, and ``{name: why}`` for each failed or skipped notebook.
    """
    timings: list[tuple[str, float]] = []
    failed: dict[str, str] = {}
    pending = list(names)
    running: dict[Future, str] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for name in list(pending):
                deps = [d for d in DEPENDS.get(name, ()) if d in names]
                if any(d in failed for d in deps):
                    failed[name] = f"skipped: its input {next(d for d in deps if d in failed)} failed"
                    pending.remove(name)
                elif len(running) < jobs and all(d in dict(timings) for d in deps):
                    running[pool.submit(execute, names.index(name) + 1, name)] = name
                    pending.remove(name)
            if not running:
                if pending:  # cannot happen with an acyclic DEPENDS; never spin
                    raise RuntimeError(f"notebooks {pending} wait on inputs that never run")
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                try:
                    timings.append((name, future.result()))
                except Exception as err:  # noqa: BLE001  (reported by the caller, with every other failure)
                    failed[name] = f"{type(err).__name__}: {str(err).strip()[-1500:]}"
                    hint = f" ({failure_hint(name)})" if failure_hint else ""
                    say(f"[{names.index(name) + 1}/{len(names)}] {name} FAILED{hint}")
    return timings, failed


def run_notebooks(preset: str = "embedded", out: str | os.PathLike = "outputs", only: Sequence[str] | None = None,
                  update_committed: bool = False, kernel: str = "python3", jobs: int = 1,
                  notebooks: str | os.PathLike | None = None) -> list[tuple[str, float]]:
    """Execute the notebooks of ``preset`` in dependency order; returns ``[(name, seconds)]`` in finishing order.

    Args:
        preset: preset name or YAML path.
        out: output folder (CSV/JSON records, executed notebooks).
        only: names of the notebooks to run (default: the preset's ``only`` list, else all that exist but
            ``EXTRA``); their inputs from notebooks left out must already be under ``out``.
        update_committed: copy each executed notebook back over ``notebooks/<name>.ipynb`` (to refresh the
            committed outputs that nbval checks).
        jobs: notebooks run at once (each kernel then gets ``cpu_count // jobs`` torch threads).
        notebooks: the repository's notebooks folder (default :func:`find_notebooks`); its ``../presets`` holds
            the presets and ``../figures`` the committed figures.
    Raises:
        RuntimeError: naming every notebook that failed or was skipped because an input failed.
    """
    import papermill  # noqa: PLC0415

    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    folder = _folder(notebooks)
    spec = load_preset(preset, folder)
    names = _select(spec, only, folder)  # every argument checked before anything is created
    out = Path(out).resolve()
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    figures = folder.parent / "figures" if update_committed else out / "figures"
    setup_env: dict[str, str] = {}
    if spec.get("setup"):  # the preset's inputs, before any notebook; kernels inherit the environment it gives
        print(f"setup: {spec['setup']} -> {out}", flush=True)
        setup_env = _run_setup(spec["setup"], out)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    if jobs > 1:  # kernels inherit the environment: keep jobs x threads within the machine's cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    env_before = {key: os.environ.get(key) for key in setup_env}
    os.environ.update(setup_env)
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            print(line, flush=True)

    def execute(k: int, name: str) -> float:
        source = folder / f"{name}.ipynb"
        params = {**spec["common"], **(spec["notebooks"].get(name) or {})}
        # a path relative to the notebooks folder, so executed notebooks never carry this machine's paths
        params["out_dir"] = os.path.relpath(out, folder)
        # figures/ holds the committed results (--update-committed); any other run draws under <out>
        params["figures_dir"] = os.path.relpath(figures, folder)
        params = _with_out_dir(params, params["out_dir"])
        declared = _declared_parameters(source)
        params = {key: value for key, value in params.items() if key in declared}
        target = out / "notebooks" / f"{name}.ipynb"
        say(f"[{k}/{len(names)}] {name} ({Path(preset).stem}) started")
        start = time.perf_counter()
        stderr = _Prefixed(name, lock)
        try:
            papermill.execute_notebook(str(source), str(target), parameters=params, cwd=str(folder),
                                       kernel_name=kernel, progress_bar=False, stderr_file=stderr)
        finally:
            stderr.close()
        seconds = time.perf_counter() - start
        say(f"[{k}/{len(names)}] {name} done in {seconds:.0f} s")
        if update_committed:
            _commit_copy(target, source, Path(preset).stem, params)
        return seconds

    started = time.perf_counter()
    try:
        timings, failed = run_in_order(names, execute, jobs, say,
                                       failure_hint=lambda name: f"see {out / 'notebooks' / name}.ipynb")
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        elif jobs > 1:
            os.environ["OMP_NUM_THREADS"] = env_threads
        for key, value in env_before.items():  # the runner's own environment as it was before setup
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    wall = time.perf_counter() - started
    print(f"{len(timings)} of {len(names)} notebooks done in {wall:.0f} s wall ({jobs} at a time); "
          f"executed copies in {out / 'notebooks'}")
    if failed:
        raise RuntimeError("notebooks failed:\n" + "\n".join(f"- {n}: {why}" for n, why in failed.items()))
    return timings


# nbval's own default cell timeout (s); `make test` passes a longer one (Makefile, NBVAL_CELL_TIMEOUT)
NBVAL_DEFAULT_TIMEOUT = 2000


def nbval_command(notebook: str | os.PathLike, cell_timeout: int = NBVAL_DEFAULT_TIMEOUT) -> list[str]:
    """The pytest command line that checks one notebook with nbval (re-executes it, compares its outputs)."""
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
            f"--nbval-cell-timeout={int(cell_timeout)}", str(notebook)]


def check_notebooks(notebooks: str | os.PathLike, jobs: int = 1, cell_timeout: int = NBVAL_DEFAULT_TIMEOUT,
                    ) -> list[tuple[str, float]]:
    """``make test``'s notebook check: nbval on every notebook of ``notebooks`` but ``EXTRA`` (a copy of the
    repository's: they write their outputs beside it), one pytest process per notebook, ``jobs`` at once, each
    started as soon as its inputs are done (:func:`run_in_order`); returns ``[(name, seconds)]``.

    Each process gets ``cpu_count // jobs`` torch threads and no stdin. Its pytest summary is printed when it
    ends, its whole report when it fails.

    Raises:
        RuntimeError: naming every notebook whose check failed or was skipped because an input failed.
    """
    import subprocess  # noqa: PLC0415

    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    folder = Path(notebooks).resolve()
    names = [n for n in NOTEBOOKS if (folder / f"{n}.ipynb").exists() and n not in EXTRA]
    if not names:
        raise FileNotFoundError(f"no soupkit notebooks in {folder}")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            print(line, flush=True)

    def execute(k: int, name: str) -> float:
        say(f"[{k}/{len(names)}] nbval {name} started")
        start = time.perf_counter()
        proc = subprocess.run(nbval_command(folder / f"{name}.ipynb", cell_timeout), cwd=folder.parent, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - start
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0:
            say("\n".join(f"  {name}: {line}" for line in lines))
            raise RuntimeError(f"nbval exit {proc.returncode}: {lines[-1] if lines else 'no output'}")
        say(f"[{k}/{len(names)}] nbval {name} done in {seconds:.0f} s: {lines[-1] if lines else ''}")
        return seconds

    started = time.perf_counter()
    timings, failed = run_in_order(names, execute, jobs, say)
    print(f"nbval: {len(timings)} of {len(names)} notebooks passed in {time.perf_counter() - started:.0f} s wall "
          f"({jobs} at a time)", flush=True)
    if failed:
        raise RuntimeError("notebook checks failed:\n" + "\n".join(f"- {n}: {why}" for n, why in failed.items()))
    return timings


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 1 (notebooks run at once), not {text!r}")
    return value


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of seconds >= 1, not {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """The command line; argument errors (unknown preset or notebook, bad --jobs) exit with one line, status 2,
    before anything is created; failed notebooks exit with their list, status 1."""
    parser = OneLineArgumentParser(prog="python -m soupkit.experiments.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="embedded", help="preset name (presets/<name>.yaml) or path")
    parser.add_argument("--notebooks", help="the repository's notebooks folder (default: notebooks/ in or above "
                        "the working folder)")
    parser.add_argument("--out", default="outputs", help="output folder")
    parser.add_argument("--only", nargs="*", help="notebook names to run (default: the preset's `only`, else all "
                        "but EXTRA)")
    parser.add_argument("--update-committed", action="store_true",
                        help="copy executed notebooks back into notebooks/ (refreshes committed outputs)")
    parser.add_argument("--kernel", default="python3",
                        help="Jupyter kernel the notebooks run on (default python3: this environment's ipykernel; "
                        "`jupyter kernelspec list` shows the others)")
    parser.add_argument("--jobs", type=_jobs, default=1, help="notebooks run at once when their inputs are ready")
    parser.add_argument("--params", metavar="NOTEBOOK",
                        help="print the preset's parameters for one notebook as YAML (for papermill -f) and exit")
    parser.add_argument("--stages", action="store_true",
                        help="print the notebooks, one line per group that may run at once, and exit")
    parser.add_argument("--nbval", action="store_true",
                        help="check the notebooks of --notebooks (a copy: they write beside it) with nbval, "
                        "--jobs at once in dependency order, instead of running a preset (make test)")
    parser.add_argument("--nbval-cell-timeout", type=_seconds, default=NBVAL_DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"with --nbval: seconds one cell may run (default {NBVAL_DEFAULT_TIMEOUT}, nbval's)")
    args = parser.parse_args(argv)
    try:
        folder = _folder(args.notebooks)
    except FileNotFoundError as err:
        parser.error(str(err))
    if args.nbval:
        try:
            return check_notebooks(folder, args.jobs, args.nbval_cell_timeout)
        except RuntimeError as err:
            parser.exit(1, f"{parser.prog}: {err}\n")
    if args.stages:
        existing = [n for n in NOTEBOOKS if (folder / f"{n}.ipynb").exists() and n not in EXTRA]
        for group in stages(existing):
            print(" ".join(f"notebooks/{n}.ipynb" for n in group))
        return []
    try:
        spec = load_preset(args.preset, folder)
        if args.params:
            print(yaml.safe_dump(notebook_parameters(args.preset, args.params, folder, args.out), sort_keys=False),
                  end="")
            return []
        _select(spec, args.only, folder)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    try:
        return run_notebooks(args.preset, args.out, args.only, args.update_committed, args.kernel, args.jobs, folder)
    except RuntimeError as err:  # the notebooks that failed, each with its error: no traceback of the runner
        parser.exit(1, f"{parser.prog}: {err}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
