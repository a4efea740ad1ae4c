"""The venv's Jupyter settings (jupyter/): no autosave in JupyterLab, no TCP-encryption warning from the kernels."""
from __future__ import annotations

import json
import logging
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("IPKernelApp", logging.WARNING, __file__, 1, message, None, None)


def test_the_kernel_config_drops_only_the_tcp_warning() -> None:
    logger = logging.getLogger("IPKernelApp")
    before = list(logger.filters)
    try:
        runpy.run_path(str(ROOT / "jupyter" / "ipython_kernel_config.py"))
        (new,) = [f for f in logger.filters if f not in before]
        assert not new.filter(_record("Kernel is running over TCP without encryption. All communication ..."))
        assert new.filter(_record("Failed to load connection file"))
    finally:
        logger.filters[:] = before


def test_jupyterlab_autosave_is_off() -> None:
    settings = json.loads((ROOT / "jupyter" / "overrides.json").read_text())
    assert settings["@jupyterlab/docmanager-extension:plugin"]["autosave"] is False


def test_make_setup_installs_both_into_the_venv() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "$(VENV)/share/jupyter/lab/settings/overrides.json" in makefile
    assert "$(VENV)/etc/ipython/ipython_kernel_config.py" in makefile
    setup = next(line for line in makefile.splitlines() if line.startswith("setup:"))
    assert "$(LAB_SETTINGS)" in setup and "$(KERNEL_CONFIG)" in setup


def test_committed_notebooks_carry_the_kernelspec_jupyterlab_writes() -> None:
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        spec = json.loads(path.read_text())["metadata"]["kernelspec"]
        assert spec == {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}, path.name
