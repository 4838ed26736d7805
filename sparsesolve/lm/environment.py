"""What a result needs to be reproduced: machine, threads, library versions, peak memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "peak_memory_mb", "release_free_memory", "resident_memory_mb", "stage_peak"]


def environment() -> dict[str, Any]:
    """Machine (platform, CPUs, torch threads, accelerator, 1-minute load average: other work sharing
    the CPUs) and versions of the libraries that matter."""
    import numpy
    import scipy
    import transformers

    from sparsesolve.version import __version__

    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1m": os.getloadavg()[0],
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {"python": platform.python_version(), "sparsesolve": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__},
    }


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def resident_memory_mb() -> float:
    """Resident memory of this process now, in MiB (``/proc/self/statm``; the peak where that is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_memory_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _high_water_mb() -> float | None:
    """``VmHWM`` of ``/proc/self/status`` in MiB (resettable, unlike ``ru_maxrss``), None where missing."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


class stage_peak:  # noqa: N801 - used as a context manager, like contextlib's
    """Peak resident memory of one stage: ``with stage_peak() as s: ...`` then ``s.before_mb`` (resident
    memory at the start) and ``s.peak_mb`` (the highest during the stage; on Linux the high-water mark
    is reset at the start through ``/proc/self/clear_refs``, elsewhere it is the process's peak)."""

    def __enter__(self) -> stage_peak:
        self.before_mb = resident_memory_mb()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mb = _high_water_mb() or peak_memory_mb()


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim(0)``); True where it did.

    Between decoder layers the heap keeps hundreds of MiB that the last layer freed (fragments
    of its chunk temporaries, Grams and gathered rows) resident; the next layer's arrays do not always
    fit those holes, so without the trim they add to its peak. Measured on SmolLM2 with two token-sharded
    ranks: README, "Beyond one device". A no-op (False) where the C library has no ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    """The C library's ``malloc_trim``, looked up once (``find_library`` runs a subprocess), or None."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
