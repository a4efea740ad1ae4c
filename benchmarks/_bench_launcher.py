"""Fresh processes for the memory/time benchmark: every measurement runs in a process of its own.

Each (method, K) pair and the step timing run in a fork of a template interpreter that has only run its imports
(``Launcher``, ``_template``), or, with ``fork=False`` / ``--no-fork``, in a new interpreter (``_spawn``), so the
RSS high-water mark and allocator caches of an earlier run cannot leak into the next number. Both run
``WORKER_SCRIPT`` (``benchmarks/memory_time.py``), whose ``__main__`` answers ``_template`` with
``_template(_worker)`` and ``_worker TASK OUT`` with ``_worker(TASK, OUT)``: the worker and every function it
calls are looked up in that script's process, not in this module.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

from _bench_common import ROOT
from soupkit.runtime._compat import import_open_clip

WORKER_SCRIPT = Path(__file__).resolve().with_name("memory_time.py")  # its __main__ serves _template and _worker


def _spawn(task: dict[str, Any], timeout: float | None, env: dict[str, str] | None = None,
           script: Path = WORKER_SCRIPT) -> tuple[dict[str, Any] | None, str]:
    """Run ``task`` in a new interpreter (``env`` added to the environment); returns (result or None, error)."""
    with tempfile.TemporaryDirectory(prefix="soupkit-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "_worker", json.dumps(task), str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return None, f"timeout after {timeout} s"
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            return None, f"rc={proc.returncode}: " + " | ".join(tail)
        return json.loads(out.read_text()), ""


class Launcher:
    """Runs each measurement in a fresh process: a fork of a template interpreter that has only imported torch,
    open_clip and soupkit.

    A forked child is a new process with its own address space, allocator state and RSS high-water mark; it
    starts from the template's state, which is an interpreter after its imports and nothing else (no model,
    no tensor work, no CUDA context), i.e. what a new interpreter reaches before the measurement starts. The
    imports (~6 s on a loaded 2-core machine) are thus paid once per environment, not once per run. Without
    ``os.fork`` (or with ``fork=False``) every run starts a new interpreter instead.

    ``script`` is the interpreter's entry: ``python script _template`` (or ``_worker``) must reach
    :func:`_template` (or the worker) from its ``__main__``, as ``benchmarks/memory_time.py`` does.
    """

    def __init__(self, env: dict[str, str] | None = None, fork: bool = True, script: Path = WORKER_SCRIPT) -> None:
        self.env = {**os.environ, **(env or {})}
        self.fork = fork and hasattr(os, "fork")
        self.script = Path(script)
        self.proc: subprocess.Popen | None = None
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        self._err = tempfile.TemporaryFile(mode="w+")

    def start(self) -> None:
        """Start the template now, so that its imports overlap the caller's other work (no-op without fork)."""
        if self.fork and (self.proc is None or self.proc.poll() is not None):
            self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(self.script), "_template"], cwd=str(ROOT),
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, bufsize=1)
        self._lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self._lines), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen, lines: "queue.Queue[str | None]") -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    def _next(self, timeout: float | None) -> dict[str, Any] | None:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return None
        return json.loads(line) if line else {"rc": "template exited"}

    def _error_tail(self, offset: int) -> str:
        self._err.seek(offset)
        lines = self._err.read().strip().splitlines()[-3:]
        self._err.seek(0, os.SEEK_END)
        return " | ".join(lines)

    def run(self, task: dict[str, Any], timeout: float | None = None) -> tuple[dict[str, Any] | None, str]:
        """Result of ``task`` (see ``_worker`` in ``benchmarks/memory_time.py``) or (None, why it failed)."""
        if not self.fork:
            return _spawn(task, timeout, self.env, self.script)
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self._err.seek(0, os.SEEK_END)
        offset = self._err.tell()
        with tempfile.TemporaryDirectory(prefix="soupkit-bench-") as tmp:
            out = Path(tmp) / "result.json"
            self.proc.stdin.write(json.dumps([json.dumps(task), str(out)]) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            started = self._next(600)
            if not started or "pid" not in started:
                self.close()
                return None, f"template failed: {self._error_tail(offset)}"
            done = self._next(timeout)
            if done is None:  # ran past the timeout: kill that child only
                os.kill(started["pid"], signal.SIGKILL)
                self._next(60)
                return None, f"timeout after {timeout} s"
            if done.get("rc") != 0 or not out.exists():
                return None, f"rc={done.get('rc')}: {self._error_tail(offset)}"
            return json.loads(out.read_text()), ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        self._err.close()


def _template(worker: Callable[[str, str], None]) -> None:
    """Import everything a worker needs, then fork one child per task read from stdin; each child runs
    ``worker(task_json, out)`` (see ``Launcher``). Called from the ``__main__`` of the launched script."""
    import_open_clip()
    import soupkit.config, soupkit.engine.layers, soupkit.engine.loop  # noqa: E401, F401, PLC0415
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a child prints goes to stderr, not into the protocol
    for line in sys.stdin:
        task_json, out = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                worker(task_json, out)
                code = 0
            except BaseException:  # noqa: BLE001  (reported through stderr and the exit code)
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        proto.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        proto.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
