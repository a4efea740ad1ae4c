"""Pinned CPU numerics, so that x86 machines with different instruction sets build the same zoo bytes.

torch picks its CPU kernels by instruction set at run time (ATen: DEFAULT / AVX2 / AVX512), MKL by processor
and oneDNN (convolutions) by ISA: the same 20 training steps give different bytes on an AVX2 and an AVX-512
machine, and a zoo of 32 fine-tunes drifts far enough to reorder the soups. These variables, read when torch
first dispatches a kernel, choose the code path every x86-64 CPU has:

==========================  ============  ==================================================================
variable                    pinned to     what it fixes
==========================  ============  ==================================================================
``ATEN_CPU_CAPABILITY``     ``default``   ATen's element-wise and reduction kernels (no AVX2/AVX-512 paths)
``MKL_CBWR``                ``COMPATIBLE`` MKL's matrix products: the same code on Intel and AMD processors
``ONEDNN_MAX_CPU_ISA``      ``SSE41``     oneDNN's convolution kernels (the patch embedding, the ResNets)
==========================  ============  ==================================================================

plus one torch thread wherever a zoo is built (``soupkit.zoo.build.build_zoo``): float sums depend on the thread count.
``benchmarks/numerics.py`` shows the effect (each setting alone changes the bytes; with the pins, every setting
this machine offers gives the same bytes) and what the pins cost in time. Not covered: other architectures
(aarch64 has neither MKL nor these paths) and other torch versions; there the committed records are matched
within measured tolerances (``soupkit.experiments.drift``), never digit for digit.

``import soupkit`` pins them (before it imports torch) unless ``SOUPKIT_NUMERICS=native`` is set; a variable
the user set already is respected. If torch dispatched a kernel before soupkit was imported, the pins may
come too late: :func:`numerics_info` reports what is in effect and every record carries it.
"""
from __future__ import annotations

import os
import platform
import sys
import warnings
from typing import Any

__all__ = ["PINS", "pin_cpu_numerics", "numerics_info", "pinned"]

PINS: dict[str, str] = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def pinned() -> bool:
    """Whether this process asks for the pinned numerics (``SOUPKIT_NUMERICS`` is not ``native``)."""
    return os.environ.get("SOUPKIT_NUMERICS", "pinned").lower() != "native"


def pin_cpu_numerics() -> dict[str, str]:
    """Set :data:`PINS` in ``os.environ`` where unset (child processes and papermill kernels inherit them);
    returns the values in effect. Does nothing with ``SOUPKIT_NUMERICS=native``."""
    if not pinned():
        return {k: os.environ[k] for k in PINS if k in os.environ}
    if "torch" in sys.modules and any(k not in os.environ for k in PINS):
        warnings.warn("torch was imported before soupkit: the pinned CPU numerics (soupkit.runtime.numerics) may not "
                      "apply in this process; import soupkit first for results that match other machines",
                      stacklevel=3)
    for key, value in PINS.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in PINS}


def numerics_info() -> dict[str, Any]:
    """What decides this process's float results: kernels chosen, pins, threads, versions (for records)."""
    import torch  # noqa: PLC0415

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numerics": "pinned" if pinned() and all(os.environ.get(k) == v for k, v in PINS.items()) else "native",
        "machine": platform.machine(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
