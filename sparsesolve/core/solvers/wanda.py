"""Wanda: keep the largest ``|W*_ij| * ||X_j||_2`` (``||X_j||_2 = sqrt(H_jj)``); no weight update."""

from __future__ import annotations

import torch

from sparsesolve.core.patterns import Pattern
from sparsesolve.core.solvers.problem import LayerProblem, LayerSolution


def wanda(
    weight: torch.Tensor,
    gram: torch.Tensor,
    pattern: Pattern,
    *,
    target: torch.Tensor | None = None,
    damp: float = 0.01,
    compute_dtype: torch.dtype | None = None,
    problem: LayerProblem | None = None,
) -> LayerSolution:
    """Prune ``weight`` (m x n) to ``pattern`` with the Wanda score, compared within each row.

    ``gram`` is the n x n Gram matrix of the inputs; only its diagonal enters the score. Dead inputs
    score zero and are pruned first.
    """
    problem = problem or LayerProblem.build(weight, gram, target=target, damp=damp, compute_dtype=compute_dtype)
    norms = torch.diagonal(problem.gram).clamp_min(0).sqrt().masked_fill(problem.dead, 0.0)
    mask = pattern.project(problem.w_star.abs() * norms)
    return problem.solution(problem.w_star, mask)
