"""What a result needs to be reproduced: machine, threads, library versions, peak memory."""

from __future__ import annotations

import os
import platform
import resource
import sys
from typing import Any

import torch

__all__ = ["environment", "peak_memory_mb"]


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
