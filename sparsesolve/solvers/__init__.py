"""Per-layer masked solvers: pure functions ``(weight, gram, pattern, *, target) -> LayerSolution``.

They know nothing about models. ``SOLVERS`` maps the mask-choosing solvers by name; ``refit`` takes a
fixed mask instead of a pattern.
"""

from __future__ import annotations

from collections.abc import Callable

from sparsesolve.solvers.admm import admm
from sparsesolve.solvers.cg_refit import cg_refit
from sparsesolve.solvers.magnitude import magnitude
from sparsesolve.solvers.problem import LayerProblem, LayerSolution, reconstruction_error
from sparsesolve.solvers.refit import refit, refit_by_cost
from sparsesolve.solvers.sparsegpt import sparsegpt
from sparsesolve.solvers.wanda import wanda

SOLVERS: dict[str, Callable[..., LayerSolution]] = {
    "magnitude": magnitude,
    "wanda": wanda,
    "sparsegpt": sparsegpt,
    "admm": admm,
}


def get_solver(name: str) -> Callable[..., LayerSolution]:
    """The solver called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}") from None


__all__ = [
    "SOLVERS",
    "LayerProblem",
    "LayerSolution",
    "admm",
    "cg_refit",
    "get_solver",
    "magnitude",
    "reconstruction_error",
    "refit",
    "refit_by_cost",
    "sparsegpt",
    "wanda",
]
