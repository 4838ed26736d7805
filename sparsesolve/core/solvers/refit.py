"""Exact least squares on a fixed mask, batched over rows.

Rows decouple: for row ``i`` with kept set ``S``, minimising ``(w - w*)^T Hd (w - w*)`` over
``w`` supported on ``S`` gives ``w_S = (Hd)_SS^{-1} (Hd w*)_S`` with ``Hd = H + lam I``. With a target
this is ridge regression of the target on the kept inputs. Rows with the same number of kept inputs
are solved together as a batch of ``k x k`` Cholesky systems, in chunks that bound the memory.
"""

from __future__ import annotations

import time

import torch

from sparsesolve.core.linalg import damped_cholesky
from sparsesolve.core.solvers.cg_refit import cg_refit
from sparsesolve.core.solvers.problem import LayerProblem, LayerSolution

BATCH_BYTES = 2**28  # at most 256 MiB of gathered k x k systems at once


def refit(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    *,
    target: torch.Tensor | None = None,
    damp: float = 0.01,
    compute_dtype: torch.dtype | None = None,
    problem: LayerProblem | None = None,
) -> LayerSolution:
    """Best weight on the fixed ``mask`` (m x n bool, True = kept) for ``(W*, H)`` (see ``problem.py``).

    ``damp=0`` gives the exact unregularised least squares whenever each ``H_SS`` is positive definite
    (else the ridge escalates and ``escalations`` says so).
    """
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    started = time.perf_counter()
    problem = problem or LayerProblem.build(weight, gram, target=target, damp=damp, compute_dtype=compute_dtype)
    damped = problem.damped_gram
    rhs = problem.rhs
    out = torch.zeros_like(problem.w_star)
    counts = mask.sum(dim=1)
    escalations = 0
    for k in counts.unique().tolist():
        if k == 0:
            continue
        rows = torch.nonzero(counts == k).squeeze(1)
        # kept column indices of each row, ascending: stable sort puts True (kept) first
        kept = torch.argsort((~mask[rows]).to(torch.int8), dim=1, stable=True)[:, :k]
        chunk = max(1, BATCH_BYTES // (k * k * out.element_size()))
        for start in range(0, rows.numel(), chunk):
            r, idx = rows[start : start + chunk], kept[start : start + chunk]
            systems = damped[idx[:, :, None], idx[:, None, :]]
            chol = damped_cholesky(systems, 0.0, check=False)
            escalations += chol.escalations
            b = torch.gather(rhs[r], 1, idx).unsqueeze(-1)
            out[r[:, None], idx] = chol.solve(b).squeeze(-1)
    return problem.solution(out, mask, escalations=escalations, started=started)


#: conjugate-gradient iterations assumed by ``refit_by_cost`` (a converged refit from a masked start)
CG_ITERATIONS_ESTIMATE = 20


def refit_by_cost(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    *,
    target: torch.Tensor | None = None,
    damp: float = 0.01,
    compute_dtype: torch.dtype | None = None,
) -> LayerSolution:
    """``refit`` or ``cg_refit``, whichever costs fewer flops for this mask.

    Per row the exact solve costs about ``k^3 / 3`` (``k`` kept inputs), conjugate gradients about
    ``CG_ITERATIONS_ESTIMATE * 2 n^2``: the exact solve wins below ``k`` of roughly ``5 n^(2/3)`` (at
    most 288 of 576 inputs at 50 %), conjugate gradients at the widths of 1B+ models.
    """
    kept = int(mask.sum(dim=1).max()) if mask.numel() else 0
    if kept**3 / 3 <= CG_ITERATIONS_ESTIMATE * 2 * mask.shape[1] ** 2:
        return refit(weight, gram, mask, target=target, damp=damp, compute_dtype=compute_dtype)
    return cg_refit(weight, gram, mask, target=target, damp=damp, compute_dtype=compute_dtype)
