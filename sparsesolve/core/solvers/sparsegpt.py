"""SparseGPT: optimal brain surgeon column by column, with blocked lazy updates.

With ``Hd = H + lam I`` and ``U`` the upper Cholesky factor of ``Hd^{-1}`` (``Hd^{-1} = U^T U``),
column ``j`` of the running weight is pruned (or kept) and the error it causes is pushed onto the
columns not yet visited::

    err = (w_j - q_j) / U_jj            (q_j = w_j on kept rows, 0 on pruned rows)
    W[:, j:] -= err  (outer)  U[j, j:]

With a ``quantizer`` (joint sparsification and quantisation, as SparseGPT does it) ``q_j`` is also
rounded to the quantisation grid of its row and group (0 stays exactly 0), so the quantisation error
is compensated by the same update as the pruning error.

The final weight is ``W* - E U`` with ``E`` the matrix of the columns' ``err``, so its error in the
damped metric is free: ``(W - W*) Hd (W - W*)^T = E U Hd U^T E^T = E E^T`` (``Hd = U^-1 U^-T``), and
``||(W - W*) X||^2 = ||E||^2 - lam ||W - W*||^2`` needs no ``m x n x n`` product (used when the
factor of ``Hd^{-1}`` needed no extra damping, the direct product otherwise).

The mask is chosen by the OBS saliency ``w^2 / U_jj^2`` of the current (already updated) weights:
once per block of columns for unstructured patterns (exact cumulative counts, per row or over the
block), and at the start of each group of ``m`` columns for N:M. Updates to the columns right of a
block are deferred and applied as one matrix product when the block is done. The loop never waits
for the device: non-finite values are caught once, in the returned weight (``LayerProblem.solution``).
"""

from __future__ import annotations

import torch

from sparsesolve.core.linalg import damped_cholesky
from sparsesolve.core.patterns import NM, Pattern, Unstructured, keep_largest
from sparsesolve.core.quantize import GroupQuantizer
from sparsesolve.core.solvers.problem import LayerProblem, LayerSolution


def sparsegpt(
    weight: torch.Tensor,
    gram: torch.Tensor,
    pattern: Pattern,
    *,
    target: torch.Tensor | None = None,
    damp: float = 0.01,
    blocksize: int = 128,
    compute_dtype: torch.dtype | None = None,
    problem: LayerProblem | None = None,
    quantizer: GroupQuantizer | None = None,
) -> LayerSolution:
    """Prune ``weight`` (m x n) to ``pattern`` with SparseGPT's OBS pass over the inputs' Gram ``H``.

    ``blocksize`` columns share one mask selection (unstructured) and one deferred update; for N:M it
    is rounded down to a multiple of ``m``. ``target``, ``damp``, ``compute_dtype``: see ``problem.py``.
    With a ``quantizer``, a second OBS pass keeps the first pass's mask and rounds every kept weight to
    the grid of its row and group, the grid taken from the first pass's sparse weights (whose range the
    compensated weights stay close to; a grid from the weights before pruning is clamped by the large
    pruning updates).
    """
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    pattern.validate(tuple(weight.shape))
    problem = problem or LayerProblem.build(weight, gram, target=target, damp=damp, compute_dtype=compute_dtype)
    upper, inverse_escalations = _inverse_upper_factor(problem)
    if isinstance(pattern, NM):
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    w, mask, squared = _obs_pass(problem.w_star, upper, pattern, blocksize)
    if quantizer is not None:
        grids = [quantizer.params(w[:, first : first + quantizer.groupsize])
                 for first in range(0, w.shape[1], quantizer.groupsize)]
        w, _, squared = _obs_pass(problem.w_star, upper, pattern, blocksize, mask, quantizer, grids)
    error = None
    if inverse_escalations == 0:  # U^T U is Hd^{-1} itself: the error identity holds
        delta = w.masked_fill(~mask, 0.0) - problem.w_star
        error = float(squared - problem.cholesky.lam.to(torch.float64) * (delta.double() ** 2).sum())
    solution = problem.solution(w, mask, escalations=inverse_escalations, error=error)
    if quantizer is not None:
        solution.grid = quantizer.grid(grids)
    return solution


def _inverse_upper_factor(problem: LayerProblem) -> tuple[torch.Tensor, int]:
    """The upper factor ``U`` (``n x n``) with ``U^T U = (H + lam I)^{-1}`` and the damping escalations
    its factorisation needed. The inverse lives only inside this call, so beside ``H`` and the
    problem's factor at most two more ``n x n`` arrays exist at once."""
    inverse = damped_cholesky(torch.cholesky_inverse(problem.cholesky.factor), 0.0)
    return inverse.factor.T.contiguous(), inverse.escalations


def _obs_pass(w_star: torch.Tensor, upper: torch.Tensor, pattern: Pattern, blocksize: int,
              fixed: torch.Tensor | None = None, quantizer: GroupQuantizer | None = None,
              grids: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One blocked OBS pass (module docstring); ``fixed``: keep this mask instead of choosing one;
    ``quantizer`` and ``grids`` (per group ``(scale, zero)``): round the kept weights to the grid.
    Returns the weight, the mask and ``||E||^2`` (float64, 0-d; no host synchronisation)."""
    rows, cols = w_star.shape
    w = w_star.clone()
    mask = torch.ones_like(w, dtype=torch.bool) if fixed is None else fixed
    squared = torch.zeros((), dtype=torch.float64, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block = w[:, i1:i2].clone()
        block_upper = upper[i1:i2, i1:i2]
        diag = torch.diagonal(block_upper)
        block_mask = mask[:, i1:i2]
        errors = torch.zeros_like(block)
        if fixed is None and isinstance(pattern, Unstructured):
            block_mask[:] = _unstructured_block_mask(pattern, block**2 / diag**2, (rows, cols), i1, i2)
        for j in range(i2 - i1):
            if fixed is None and isinstance(pattern, NM) and j % pattern.m == 0:
                group = slice(j, j + pattern.m)
                block_mask[:, group] = keep_largest(block[:, group] ** 2 / diag[group] ** 2, pattern.n, dim=1, check=False)
            column = block[:, j]
            kept = torch.where(block_mask[:, j], column, torch.zeros((), dtype=column.dtype, device=column.device))
            if quantizer is not None and grids is not None:
                scale, zero = grids[(i1 + j) // quantizer.groupsize]
                kept = quantizer.quantize(kept[:, None], scale, zero)[:, 0]
            err = (column - kept) / diag[j]
            block[:, j:] -= err[:, None] * block_upper[j, j:][None, :]
            block[:, j] = kept
            errors[:, j] = err
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
        squared += (errors.double() ** 2).sum()
    return w, mask, squared


def _unstructured_block_mask(
    pattern: Unstructured, scores: torch.Tensor, shape: tuple[int, int], i1: int, i2: int
) -> torch.Tensor:
    """Mask for columns ``[i1, i2)``: the cumulative share of the zeros, lowest scores pruned."""
    zeros = pattern.zeros_before(shape, i2) - pattern.zeros_before(shape, i1)
    if pattern.scope == "layer":
        return keep_largest(scores.reshape(-1), zeros, check=False).reshape(scores.shape)
    return keep_largest(scores, zeros, dim=1, check=False)
