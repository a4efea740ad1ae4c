"""Check a notebook's parameters before it runs: one sentence per mistake, naming the parameter, what it accepts
and the fix; nothing printed when all is well.

Every notebook calls :func:`check_notebook` in the code cell right after its ``parameters`` cell, which is also
after the cell papermill injects there, so it sees the values a run was given::

    from soupkit.experiments.params import Needs, check_notebook
    check_notebook(globals(), "02_main_table", methods="methods", needs=[Needs.zoo()])

It checks, in this order:

* **the working folder**: every relative path parameter is relative to ``notebooks/`` (the defaults
  ``"../outputs"``, the paths the runner passes). A kernel started at the repository root (``papermill
  notebooks/02_main_table.ipynb ...`` from there) is moved into ``notebooks/`` (``os.chdir``), so every relative
  path of the notebook, parameters and the rest, means the same wherever papermill was started. A kernel
  elsewhere is left where it is and a missing input's sentence says where relative paths were read from.
* **unknown parameters**: names papermill injected (its cell starts with ``# Parameters``; read from the
  kernel's input history) that the notebook's ``parameters`` cell does not declare -- papermill itself only
  warns "Passed unknown parameter" and runs with the defaults.
* **types**: each declared parameter against the type of its default in the ``parameters`` cell (read from the
  notebook file); an int is accepted for a float and becomes that float, and None for a number (a preset's
  ``null``: ``heldout_size`` = the whole split). The learning settings a cell leaves None (each method's own
  default, :data:`LIBRARY_DEFAULTS`) are checked against the library default's type.
* **method lists**: comma-separated names of :data:`soupkit.METHODS` (``"all"`` where the notebook runs all).
* **inputs** another notebook writes (:class:`Needs`): the sentence names the notebook to run first.

It also turns on soupkit's progress lines on stderr (:mod:`soupkit.runtime.progress`) for the notebook's long cells.
"""
from __future__ import annotations

import ast
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, MutableMapping, Sequence

from soupkit.config import HYPERPLANE_DEFAULTS, LEARNED_DEFAULTS
from soupkit.errors import MissingInputError, ParameterError
from soupkit.experiments.runner import find_notebooks
from soupkit.methods.registry import METHODS

__all__ = ["Needs", "check_notebook", "declared_parameters", "injected_names", "check_types", "check_unknown",
           "check_methods", "parse_list", "parse_methods", "enter_notebook_folder", "check_inputs", "LIBRARY_DEFAULTS"]

_INJECTED_MARK = "# Parameters"  # the first line of the cell papermill injects (its python translator)
_KINDS = {bool: "True or False", int: "a whole number", float: "a number", str: "a string"}
# parameters whose notebook default is None, "each method's own default": a value given is checked against the
# type of that library default instead
LIBRARY_DEFAULTS: dict[str, float] = {"learned_lr": LEARNED_DEFAULTS.algorithm.lr,
                                      "hyperplane_lr": HYPERPLANE_DEFAULTS.algorithm.lr,
                                      "weight_decay": HYPERPLANE_DEFAULTS.algorithm.weight_decay,
                                      "epochs": HYPERPLANE_DEFAULTS.algorithm.epochs}


@dataclass(frozen=True)
class Needs:
    """An input another notebook writes.

    Attributes:
        path: a template over the notebook's parameters, e.g. ``"{out_dir}/{zoo_name}"``; ``{method_dir}`` makes
            one path per method of the ``methods`` parameter (``mehl+`` -> ``mehl_plus``).
        made_by: the notebook that writes it, e.g. ``"01_zoo"``.
        what: how the sentence calls it ("the zoo").
        markers: files inside ``path`` of which one must exist (none: ``path`` itself must exist).
        unless: a bool parameter that, when True, makes the notebook build the input itself.
    """

    path: str
    made_by: str
    what: str
    markers: tuple[str, ...] = ()
    unless: str | None = None

    @classmethod
    def zoo(cls, path: str = "{out_dir}/{zoo_name}") -> "Needs":
        """The embedded zoo of notebook 01 (``zoo.json``) or a zoo it registered (``source.json``)."""
        return cls(path, "01_zoo", "the zoo", ("zoo.json", "source.json"))


def _literal_assignments(source: str) -> dict[str, Any]:
    """``{name: value}`` of the top-level ``name = <literal>`` statements of ``source`` (others: ``...``)."""
    found: dict[str, Any] = {}
    for node in ast.parse(source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) and node.value is not None else None
        if isinstance(target, ast.Name):
            try:
                found[target.id] = ast.literal_eval(node.value)
            except ValueError:
                found[target.id] = ...  # declared, but no literal default to take a type from
    return found


def _file_name(notebook: str) -> str:
    """``"02_main_table"`` or ``"02_main_table.ipynb"`` -> ``"02_main_table.ipynb"``."""
    return notebook if notebook.endswith(".ipynb") else f"{notebook}.ipynb"


def _notebook_file(notebook: str) -> Path | None:
    """The notebook file: in the working folder (the copy being run) or else in the repository's notebooks/."""
    name = _file_name(notebook)
    if (Path.cwd() / name).is_file():
        return Path.cwd() / name
    try:
        path = find_notebooks() / name
    except FileNotFoundError:
        return None
    return path if path.is_file() else None


def declared_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """``{name: default}`` of a notebook's ``parameters`` cell, by name (``"02_main_table"``) or path; ``{}`` if
    the file is not found."""
    import nbformat  # noqa: PLC0415  (only where notebooks are checked)

    path = Path(notebook) if Path(notebook).suffix == ".ipynb" and Path(notebook).is_file() else \
        _notebook_file(str(notebook))
    if path is None:
        return {}
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return _literal_assignments(cell.source)
    return {}


def injected_names(namespace: Mapping[str, Any]) -> list[str]:
    """Names assigned by the latest papermill-injected cell in the kernel's input history (``[]`` outside IPython
    or when nothing was injected)."""
    history = namespace.get("_ih") or namespace.get("In") or []
    for source in reversed(list(history)):
        if isinstance(source, str) and source.lstrip().startswith(_INJECTED_MARK):
            try:
                return list(_literal_assignments(source))
            except SyntaxError:
                return []
    return []


def check_unknown(names: Iterable[str], declared: Iterable[str]) -> None:
    """Raise :class:`ParameterError` for the first of ``names`` not in ``declared``."""
    __tracebackhide__ = True
    declared = list(declared)
    for name in names:
        if name not in declared:
            close = difflib.get_close_matches(name, declared, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParameterError(f"unknown parameter {name!r}{hint}; this notebook's parameters are "
                                 f"{', '.join(declared)}")


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def check_types(namespace: MutableMapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Raise :class:`ParameterError` for the first parameter whose value's type is not its default's (papermill
    parameters are scalars: str, int, float, bool); an int given for a float becomes that float, None is
    accepted for a number. A parameter in :data:`LIBRARY_DEFAULTS` whose default is None takes that default's
    type."""
    __tracebackhide__ = True
    for name, default in defaults.items():
        if default is None:
            default = LIBRARY_DEFAULTS.get(name)
        if default is ... or default is None or name not in namespace:
            continue
        value, want = namespace[name], type(default)
        if type(value) is want:
            continue
        if value is None and want in (int, float):
            continue  # a preset's null, e.g. heldout_size: the whole split
        if want is float and type(value) is int:
            namespace[name] = float(value)  # papermill reads "-p epochs 5" as an int
            continue
        fix = f"-p {name} {default!r}" if want is not str else f"-r {name} {value!r} (-r passes it as text)"
        raise ParameterError(f"parameter {name!r} is {value!r} ({_kind(value)}) but takes {_KINDS.get(want, want.__name__)} "
                             f"like its default {default!r}; pass e.g. {fix}")


def parse_list(text: Any, cast: Callable[[str], Any] = int) -> list[Any]:
    """A comma-separated notebook parameter as a list (papermill parameters are scalars); empty parts dropped.

    >>> parse_list("0, 22,42"), parse_list(" 0.5,", float), parse_list("")
    ([0, 22, 42], [0.5], [])
    """
    return [cast(part.strip()) for part in str(text).split(",") if part.strip()]


def parse_methods(value: str, allow_all: bool = False) -> list[str]:
    """Method names of a comma-separated parameter (``"all"``: every method, where ``allow_all``)."""
    if allow_all and value.strip() == "all":
        return list(METHODS)
    return parse_list(value, str)


def check_methods(name: str, value: Any, allow_all: bool = False) -> list[str]:
    """The methods of parameter ``name``; :class:`ParameterError` for an unknown name or an empty list."""
    __tracebackhide__ = True
    choices = ", ".join(METHODS) + (" (or all)" if allow_all else "")
    names = parse_methods(str(value), allow_all)
    if not names:
        raise ParameterError(f"parameter {name!r} names no method; give comma-separated names from {choices}")
    for method in names:
        if method not in METHODS:
            close = difflib.get_close_matches(method, list(METHODS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParameterError(f"{method!r} is not a method{hint}; choose from {choices} for parameter {name!r}, "
                                 f"e.g. -p {name} \"mehl+,greedy\"")
    return names


def enter_notebook_folder(notebook: str) -> Path:
    """Move into ``notebooks/`` when the kernel was started at the folder above it (the repository root, or a
    copy's root), so relative paths mean what they mean from the notebook; returns the working folder."""
    name = _file_name(notebook)
    here = Path.cwd()
    if not (here / name).is_file() and (here / "notebooks" / name).is_file():
        os.chdir(here / "notebooks")
    return Path.cwd()


def check_inputs(namespace: Mapping[str, Any], needs: Sequence[Needs], notebook: str,
                 methods: Sequence[str] = ()) -> None:
    """Raise :class:`MissingInputError` for the first input of ``needs`` that is not there, naming the notebook
    that writes it (and where relative paths were read from, if this is not a notebooks folder)."""
    __tracebackhide__ = True
    name = _file_name(notebook)
    values = {k: v for k, v in namespace.items() if isinstance(v, (str, int, float, bool))}
    for need in needs:
        if need.unless and namespace.get(need.unless):
            continue
        dirs = [m.replace("+", "_plus") for m in methods] if "{method_dir}" in need.path else [None]
        for method_dir in dirs:
            path = Path(need.path.format(**values, method_dir=method_dir))
            found = any((path / m).exists() for m in need.markers) if need.markers else path.exists()
            if found:
                continue
            where = "" if (Path.cwd() / name).is_file() else \
                f"; relative paths are read from {Path.cwd()}, start papermill in notebooks/ or the repository root"
            inside = f" (no {' or '.join(need.markers)} in it)" if need.markers and path.is_dir() else ""
            other = f" or set {need.unless} = True to build it here" if need.unless else ""
            raise MissingInputError(f"{need.what} {path} ({path.resolve()}) is missing{inside}: run "
                                    f"notebooks/{need.made_by}.ipynb first (it writes it){other}{where}")


def check_notebook(namespace: MutableMapping[str, Any], notebook: str, *, methods: str | Sequence[str] = (),
                   allow_all: bool = False, needs: Sequence[Needs] = ()) -> None:
    """Check the parameters of the running notebook ``notebook`` (e.g. ``"02_main_table"``) in ``namespace``
    (its ``globals()``); see the module docstring. Prints nothing; raises :class:`ParameterError` or
    :class:`MissingInputError` with one sentence.

    Args:
        methods: the parameter(s) holding comma-separated method names.
        allow_all: those parameters may be ``"all"``.
        needs: inputs other notebooks write; ``{method_dir}`` paths expand over the first ``methods`` parameter.
    """
    __tracebackhide__ = True
    from soupkit.runtime import progress  # noqa: PLC0415

    enter_notebook_folder(notebook)
    defaults = declared_parameters(notebook)
    if defaults:
        check_unknown(injected_names(namespace), defaults)
        check_types(namespace, defaults)
    method_params = [methods] if isinstance(methods, str) else list(methods)
    lists = [check_methods(p, namespace[p], allow_all) for p in method_params if p in namespace]
    check_inputs(namespace, needs, notebook, lists[0] if lists else ())
    progress.enable()
