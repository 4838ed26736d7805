"""SparseGPT: optimal brain surgeon column by column, with blocked lazy updates.

With ``Hd = H + lam I`` and ``U`` the upper Cholesky factor of ``Hd^{-1}`` (``Hd^{-1} = U^T U``),
column ``j`` of the running weight is pruned (or kept) and the error it causes is pushed onto the
columns not yet visited::

    err = (w_j - q_j) / U_jj            (q_j = w_j on kept rows, 0 on pruned rows)
    W[:, j:] -= err  (outer)  U[j, j:]

The mask is chosen by the OBS saliency ``w^2 / U_jj^2`` of the current (already updated) weights:
once per block of columns for unstructured patterns (exact cumulative counts, per row or over the
block), and at the start of each group of ``m`` columns for N:M. Updates to the columns right of a
block are deferred and applied as one matrix product when the block is done.
"""

from __future__ import annotations

import torch

from sparsesolve.linalg import damped_cholesky
from sparsesolve.patterns import NM, Pattern, Unstructured, keep_largest
from sparsesolve.solvers.problem import LayerProblem, LayerSolution


def sparsegpt(
    weight: torch.Tensor,
    gram: torch.Tensor,
    pattern: Pattern,
    *,
    target: torch.Tensor | None = None,
    damp: float = 0.01,
    blocksize: int = 128,
    compute_dtype: torch.dtype | None = None,
) -> LayerSolution:
    """Prune ``weight`` (m x n) to ``pattern`` with SparseGPT's OBS pass over the inputs' Gram ``H``.

    ``blocksize`` columns share one mask selection (unstructured) and one deferred update; for N:M it
    is rounded down to a multiple of ``m``. ``target``, ``damp``, ``compute_dtype``: see ``problem.py``.
    """
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    pattern.validate(tuple(weight.shape))
    problem = LayerProblem.build(weight, gram, target=target, damp=damp, compute_dtype=compute_dtype)
    rows, cols = problem.w_star.shape
    hinv = torch.cholesky_inverse(problem.cholesky.factor)
    inv_chol = damped_cholesky(hinv, 0.0)
    upper = inv_chol.factor.T.contiguous()

    if isinstance(pattern, NM):
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    w = problem.w_star.clone()
    mask = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block = w[:, i1:i2].clone()
        block_upper = upper[i1:i2, i1:i2]
        diag = torch.diagonal(block_upper)
        block_mask = mask[:, i1:i2]
        errors = torch.zeros_like(block)
        if isinstance(pattern, Unstructured):
            block_mask[:] = _unstructured_block_mask(pattern, block**2 / diag**2, (rows, cols), i1, i2)
        for j in range(i2 - i1):
            if isinstance(pattern, NM) and j % pattern.m == 0:
                group = slice(j, j + pattern.m)
                block_mask[:, group] = keep_largest(block[:, group] ** 2 / diag[group] ** 2, pattern.n, dim=1)
            column = block[:, j]
            kept = torch.where(block_mask[:, j], column, torch.zeros((), dtype=column.dtype, device=column.device))
            err = (column - kept) / diag[j]
            block[:, j:] -= err[:, None] * block_upper[j, j:][None, :]
            block[:, j] = kept
            errors[:, j] = err
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    return problem.solution(w, mask, escalations=inv_chol.escalations)


def _unstructured_block_mask(
    pattern: Unstructured, scores: torch.Tensor, shape: tuple[int, int], i1: int, i2: int
) -> torch.Tensor:
    """Mask for columns ``[i1, i2)``: the cumulative share of the zeros, lowest scores pruned."""
    zeros = pattern.zeros_before(shape, i2) - pattern.zeros_before(shape, i1)
    if pattern.scope == "layer":
        return keep_largest(scores.reshape(-1), zeros).reshape(scores.shape)
    return keep_largest(scores, zeros, dim=1)
