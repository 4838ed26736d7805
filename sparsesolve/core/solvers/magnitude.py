"""Magnitude pruning: keep the largest ``|W*_ij|`` under the pattern; no weight update."""

from __future__ import annotations

import torch

from sparsesolve.core.patterns import Pattern
from sparsesolve.core.solvers.problem import LayerProblem, LayerSolution


def magnitude(
    weight: torch.Tensor,
    gram: torch.Tensor | None,
    pattern: Pattern,
    *,
    target: torch.Tensor | None = None,
    damp: float = 0.01,
    compute_dtype: torch.dtype | None = None,
    problem: LayerProblem | None = None,
) -> LayerSolution:
    """Prune ``weight`` (m x n) to ``pattern`` by magnitude of ``W*`` (see ``problem.py``).

    ``gram`` (n x n) is only used to report the reconstruction error and to reduce a ``target``;
    ``None`` means ``H = I``, so the error is ``||W - W*||_F^2``.
    """
    if gram is None:
        gram = torch.eye(weight.shape[-1], dtype=weight.dtype, device=weight.device)
    problem = problem or LayerProblem.build(weight, gram, target=target, damp=damp, compute_dtype=compute_dtype)
    mask = pattern.project(problem.w_star.abs())
    return problem.solution(problem.w_star, mask)
