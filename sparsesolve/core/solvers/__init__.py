"""Per-layer masked solvers: pure functions ``(weight, gram, pattern, *, target) -> LayerSolution``.

They know nothing about models. ``SOLVERS`` maps the mask-choosing solvers by name; ``refit`` takes a
fixed mask instead of a pattern.
"""

from __future__ import annotations

from collections.abc import Callable

from sparsesolve.core.config import SOLVER_NAMES
from sparsesolve.core.solvers.admm import admm
from sparsesolve.core.solvers.cg_refit import cg_refit
from sparsesolve.core.solvers.magnitude import magnitude
from sparsesolve.core.solvers.problem import LayerProblem, LayerSolution, reconstruction_error
from sparsesolve.core.solvers.refit import refit, refit_by_cost
from sparsesolve.core.solvers.sparsegpt import sparsegpt
from sparsesolve.core.solvers.wanda import wanda

#: the mask-choosing solvers by name, in ``config.SOLVER_NAMES`` order (the names the configuration
#: validates against without importing torch; a new solver is a file here plus its name there).
SOLVERS: dict[str, Callable[..., LayerSolution]] = {name: globals()[name] for name in SOLVER_NAMES}


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
