"""ADMM for the cardinality-constrained layer problem (ALPS-style), finished by a refit on its support.

Work in the rescaled space where ``diag(Hd) = 1`` (``d = sqrt(diag Hd)``, ``Hs = Hd / (d d^T)``,
weights times ``d``), so that the pattern projection compares ``|W_ij| d_j`` (a Wanda-like score)
and one penalty scale fits every layer. Split ``W = B = D`` with ``D`` in the pattern set::

    B = (W* Hs - V + rho D)(Hs + rho I)^{-1}       (rows of W as row vectors)
    D = Proj_pattern(B + V / rho)
    V = V + rho (B - D)

``Hs = Q diag(ev) Q^T`` is eigendecomposed once, so every ``(Hs + rho I)^{-1}`` is
``Q diag(1 / (ev + rho)) Q^T``. Every ``check_every`` iterations the support change ``s`` (out of
``k`` kept entries) drives the penalty: ``s/k > 0.1 -> rho * 1.3``, ``> 0.005 -> rho * 1.2``, else
``rho * 1.1``. The loop stops once the support is unchanged over a check and ``B`` is close to ``D``,
or at ``max_iter``; the final support is then refitted (``refit_by_cost``: the exact per-row solve
for small layers, conjugate gradients at large widths).
"""

from __future__ import annotations

import torch

from sparsesolve.core.patterns import Pattern
from sparsesolve.core.solvers.problem import LayerProblem, LayerSolution
from sparsesolve.core.solvers.refit import refit_by_cost


def admm(
    weight: torch.Tensor,
    gram: torch.Tensor,
    pattern: Pattern,
    *,
    target: torch.Tensor | None = None,
    damp: float = 0.01,
    rho: float = 0.1,
    rho_max: float = 1e6,
    max_iter: int = 300,
    check_every: int = 3,
    tol: float = 1e-4,
    compute_dtype: torch.dtype | None = None,
    problem: LayerProblem | None = None,
) -> LayerSolution:
    """Prune ``weight`` (m x n) to ``pattern`` by ADMM on ``(W*, Hd)``, then refit the support
    (``refit_by_cost``: exactly on small layers, by conjugate gradients to ``CG_TOL`` on wide ones).

    ``rho`` is the initial penalty (relative: ``diag Hs = 1``), capped at ``rho_max``; ``tol`` bounds
    ``||B - D|| / ||D||`` for stopping. ``info`` of the result holds ``rho`` (final) and
    ``support_changes`` (one count per check).
    """
    if rho <= 0 or rho_max < rho or max_iter < 1 or check_every < 1:
        raise ValueError("admm needs 0 < rho <= rho_max, max_iter >= 1 and check_every >= 1")
    pattern.validate(tuple(weight.shape))
    problem = problem or LayerProblem.build(weight, gram, target=target, damp=damp, compute_dtype=compute_dtype)
    damped = problem.damped_gram
    scale = torch.diagonal(damped).sqrt()
    scaled_gram = damped / scale[:, None] / scale[None, :]
    eigvals, eigvecs = torch.linalg.eigh(scaled_gram)
    w_scaled = problem.w_star * scale
    gram_w = w_scaled @ scaled_gram

    def project(values: torch.Tensor) -> torch.Tensor:
        return pattern.project(values.abs())

    support = project(w_scaled)
    d = w_scaled * support
    v = torch.zeros_like(d)
    kept = int(support.sum())
    changes: list[int] = []
    iteration = 0
    for iteration in range(1, max_iter + 1):
        b = ((gram_w - v + rho * d) @ eigvecs / (eigvals + rho)) @ eigvecs.T
        new_support = project(b + v / rho)
        d = (b + v / rho) * new_support
        v = v + rho * (b - d)
        if iteration % check_every:
            continue
        changed = int((new_support != support).sum())
        changes.append(changed)
        support = new_support
        residual = float(torch.linalg.norm(b - d) / torch.linalg.norm(d).clamp_min(1e-30))
        if changed == 0 and residual < tol:
            break
        ratio = changed / max(kept, 1)
        rho = min(rho_max, rho * (1.3 if ratio > 0.1 else 1.2 if ratio > 0.005 else 1.1))
    # refit the last projected support on Hd = H + lam I, the objective ADMM minimised
    exact = refit_by_cost(problem.w_star, problem.damped_gram, new_support, damp=0.0, compute_dtype=problem.w_star.dtype)
    return problem.solution(
        exact.weight.to(problem.w_star.dtype), new_support, iterations=iteration, escalations=exact.escalations,
        rho=rho, support_changes=changes,
    )
