"""``make demo`` (until the language-model pipeline lands): every method on small MLPs.

Prunes a 3-layer ReLU MLP and a SwiGLU block at 70 %, 90 % and 2:4 with every method, and prints the
relative end-to-end error ``||f_pruned(X) - f_dense(X)||^2 / ||f_dense(X)||^2`` on the calibration
inputs and on held-out inputs from the same distribution. Seeded: the numbers reproduce.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from sparsesolve.api import prune
from sparsesolve.core.chain import GatedMLP
from sparsesolve.core.config import METHODS


def inputs(n_tokens: int, width: int, seed: int) -> torch.Tensor:
    """Correlated Gaussian inputs ``N x width`` with a few large-scale (outlier) features."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(width) + 0.5 * torch.randn(width, width, generator=torch.Generator().manual_seed(0))
    scale = torch.ones(width)
    scale[:3] = 8.0
    return (torch.randn(n_tokens, width, generator=g) @ mix) * scale


def models() -> dict[str, nn.Module]:
    """The two demo models, seeded."""
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    torch.manual_seed(0)
    return {"relu-mlp 64-256-256-64": relu, "swiglu 64-256-64": nn.Sequential(GatedMLP(64, 256))}


def relative_error(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    """``||f(x) - f_dense(x)||^2 / ||f_dense(x)||^2``."""
    with torch.no_grad():
        y = dense(x)
        return float(((model(x) - y) ** 2).sum() / (y**2).sum())


def compare(patterns: tuple[str, ...] = ("0.7", "0.9", "2:4")) -> list[dict]:
    """Every method on both demo models: one row per (model, method, pattern) with the relative error
    on calibration and held-out inputs and the wall time of the prune."""
    calibration, held_out = inputs(4096, 64, seed=1), inputs(4096, 64, seed=2)
    rows = []
    for name, dense in models().items():
        for method in METHODS:
            for pattern in patterns:
                model = copy.deepcopy(dense)
                started = time.perf_counter()
                prune(model, calibration, method=method, pattern=pattern)
                rows.append({"model": name, "method": method, "pattern": pattern,
                             "seconds": time.perf_counter() - started,
                             "calibration_error": relative_error(model, dense, calibration),
                             "held_out_error": relative_error(model, dense, held_out)})
    return rows


def main() -> None:
    """Print one table per model: methods x patterns, calibration / held-out error."""
    torch.set_num_threads(2)
    patterns = ("0.7", "0.9", "2:4")
    rows = compare(patterns)
    for name in models():
        print(f"\n{name}: relative output error, calibration / held-out (lower is better)")
        print(f"{'method':<10}" + "".join(f"{p:>20}" for p in patterns) + f"{'time':>9}")
        for method in METHODS:
            mine = [r for r in rows if r["model"] == name and r["method"] == method]
            cells = "".join(f"{r['calibration_error']:.4f} / {r['held_out_error']:.4f}".rjust(20) for r in mine)
            print(f"{method:<10}{cells}{sum(r['seconds'] for r in mine):>8.1f}s")


if __name__ == "__main__":
    main()
