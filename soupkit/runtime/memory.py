"""Measured peak memory of a block of code: the CUDA allocator's peak, or the process's peak RSS on CPU.

Nothing here estimates: on CUDA the numbers come from ``torch.cuda.max_memory_allocated``; on CPU from the
kernel's resident-set high-water mark (``VmHWM``), which is reset to the current RSS at the start of the
block (``/proc/self/clear_refs``), so the peak is the one reached inside the block. Where that reset is not
available (non-Linux), a sampling thread records the largest RSS it sees every few milliseconds.
"""
from __future__ import annotations

import _thread
import signal
import threading
import time
from typing import Any

import torch

from soupkit.errors import MemoryCapExceeded

__all__ = ["PeakMemory", "MemoryCap", "current_rss_bytes"]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process in bytes (0 where it cannot be read)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import resource  # noqa: PLC0415  (POSIX only)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # pragma: no cover - platforms without either source
        return 0


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak memory used inside it, in bytes above the level at entry.

    >>> with PeakMemory("cpu") as meter:
    ...     x = torch.ones(1_000_000)
    >>> meter.peak_bytes >= 0
    True
    """

    def __init__(self, device: str | torch.device = "cpu", sample_seconds: float = 0.002) -> None:
        self.device = torch.device(device)
        self.sample_seconds = sample_seconds
        self.peak_bytes: int = 0
        self.source: str = ""
        self._start = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_max = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.source = "cuda.max_memory_allocated"
            return self
        self._start = current_rss_bytes()
        if _reset_high_water_mark():
            self.source = "VmHWM"
        else:
            self.source = "sampled RSS"
            self._sampled_max = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled_max = max(self._sampled_max, current_rss_bytes())
            time.sleep(self.sample_seconds)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled_max, current_rss_bytes())
        else:
            peak = (_status_kib("VmHWM") or 0) * 1024
        self.peak_bytes = max(0, peak - self._start)

    def __repr__(self) -> str:
        return f"PeakMemory(device={self.device}, peak_bytes={self.peak_bytes}, source={self.source!r})"



class MemoryCap:
    """Context manager that stops the code inside it once it uses more than ``cap_bytes`` above the level at
    entry, raising :class:`MemoryCapExceeded` -- what a machine with that much memory would do, without
    touching the machine's real limit.

    CUDA: the caching allocator's limit (``set_per_process_memory_fraction``), so the allocation that would
    pass the cap raises out-of-memory inside the block. CPU: a watchdog thread reads the resident-set
    high-water mark every ``poll_seconds`` and interrupts the main thread (``KeyboardInterrupt``, turned into
    MemoryCapExceeded on exit) when it passes the cap; the block can overshoot by what it allocates within
    one poll, and must run on the main thread.
    """

    def __init__(self, cap_bytes: int, device: str | torch.device = "cpu", poll_seconds: float = 0.002) -> None:
        if cap_bytes <= 0:
            raise ValueError(f"cap_bytes must be > 0, got {cap_bytes}")
        self.cap_bytes = int(cap_bytes)
        self.device = torch.device(device)
        self.poll_seconds = poll_seconds
        self.exceeded_at: int | None = None  # bytes above the entry level when the cap was passed
        self._start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_fraction: float | None = None
        self._old_sigint: Any = None

    def __enter__(self) -> "MemoryCap":
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            total = torch.cuda.get_device_properties(index).total_memory
            self._start = torch.cuda.memory_allocated(index)
            torch.cuda.set_per_process_memory_fraction(min(1.0, (self._start + self.cap_bytes) / total), index)
            self._old_fraction = 1.0
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("MemoryCap on CPU interrupts the main thread; use it there")
        # interrupt_main() raises KeyboardInterrupt only where Python handles SIGINT: a process started in the
        # background (nohup, `cmd &` in a script) inherits SIGINT ignored, and the cap would never stop the block
        if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
            self._old_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        self._start = current_rss_bytes()
        _reset_high_water_mark()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _used(self) -> int:
        peak = (_status_kib("VmHWM") or 0) * 1024
        return max(peak, current_rss_bytes()) - self._start

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            used = self._used()
            if used > self.cap_bytes:
                self.exceeded_at = used
                _thread.interrupt_main()
                return

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
                if self.exceeded_at is not None and not (exc_type and issubclass(exc_type, KeyboardInterrupt)):
                    for _ in range(50):  # the block ended just as the cap was passed: let the interrupt land
                        time.sleep(0.002)
        except KeyboardInterrupt:
            if self.exceeded_at is None:
                raise
            exc_type = KeyboardInterrupt
        finally:
            if self._old_sigint is not None:
                signal.signal(signal.SIGINT, self._old_sigint)
                self._old_sigint = None
        if self._old_fraction is not None:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(self._old_fraction, index)
            if exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
                raise MemoryCapExceeded(self.cap_bytes, self.cap_bytes, "CUDA allocator limit") from None
            return False
        if self.exceeded_at is not None:
            raise MemoryCapExceeded(self.cap_bytes, self.exceeded_at, "resident set, CPU") from None
        return False
