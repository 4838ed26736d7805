"""Exact references for small problems: the optimal mask by brute force.

For a row ``w*`` and kept set ``S`` the best weight is the refit ``w_S = H_SS^{-1} (H w*)_S`` and its
error is ``w*^T H w* - (H w*)_S^T H_SS^{-1} (H w*)_S``. Enumerating every ``S`` the pattern allows
gives the global optimum of the (NP-hard) masked problem; feasible for rows of at most 12 inputs.
"""

from __future__ import annotations

import itertools

import torch

from sparsesolve.core.patterns import NM, Pattern, Unstructured, round_half_up

MAX_INPUTS = 12


def random_problem(seed: int, rows: int = 4, inputs: int = 8, tokens: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded tiny problem ``(W*, H)`` in float64: Gaussian ``W*`` (rows x inputs) and ``H = X^T X``
    with ``X`` (tokens x inputs) correlated Gaussian, ``Z (I + 0.6 G)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inputs, generator=g, dtype=torch.float64)
    x = x @ (torch.eye(inputs, dtype=torch.float64) + 0.6 * torch.randn(inputs, inputs, generator=g, dtype=torch.float64))
    return torch.randn(rows, inputs, generator=g, dtype=torch.float64), x.T @ x


def _kept_sets(pattern: Pattern, n: int) -> list[tuple[int, ...]]:
    if isinstance(pattern, NM):
        groups = [itertools.combinations(range(g, g + pattern.m), pattern.m - pattern.n) for g in range(0, n, pattern.m)]
        return [tuple(i for part in choice for i in part) for choice in itertools.product(*groups)]
    if isinstance(pattern, Unstructured) and pattern.scope == "row":
        return list(itertools.combinations(range(n), n - round_half_up(pattern.sparsity * n)))
    raise ValueError("brute force supports per-row unstructured and N:M patterns")


def brute_force(weight: torch.Tensor, gram: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Globally optimal ``(weight, mask, error)`` for ``min ||(W - W*) X||^2`` under ``pattern``.

    ``weight`` is ``W*`` (m x n, n <= 12), ``gram`` the positive definite ``H = X^T X``; float64.
    """
    m, n = weight.shape
    if n > MAX_INPUTS:
        raise ValueError(f"brute force enumerates masks of rows of at most {MAX_INPUTS} inputs, got {n}")
    pattern.validate((m, n))
    w_star, h = weight.double(), gram.double()
    best_w = torch.zeros_like(w_star)
    best_mask = torch.zeros(m, n, dtype=torch.bool)
    total = 0.0
    kept_sets = _kept_sets(pattern, n)
    for i in range(m):
        hw = h @ w_star[i]
        base = float(w_star[i] @ hw)
        best = (float("inf"), None, None)
        for kept in kept_sets:
            idx = list(kept)
            sol = torch.linalg.solve(h[idx][:, idx], hw[idx]) if idx else hw[:0]
            err = base - float(hw[idx] @ sol)
            if err < best[0]:
                best = (err, idx, sol)
        err, idx, sol = best
        best_w[i, idx] = sol
        best_mask[i, idx] = True
        total += err
    return best_w, best_mask, total
