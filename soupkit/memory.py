"""Measured peak memory of a block of code: the CUDA allocator's peak, or the process's peak RSS on CPU.

Nothing here estimates: on CUDA the numbers come from ``torch.cuda.max_memory_allocated``; on CPU from the
kernel's resident-set high-water mark (``VmHWM``), which is reset to the current RSS at the start of the
block (``/proc/self/clear_refs``), so the peak is the one reached inside the block. Where that reset is not
available (non-Linux), a sampling thread records the largest RSS it sees every few milliseconds.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import torch

__all__ = ["PeakMemory", "current_rss_bytes"]


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

