"""The matmul-shaped fixed-mask refit (conjugate gradients) against the exact per-row refit and cvxpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import correlated_inputs, random_weight
from test_solvers import cvxpy_refit

import sparsesolve as ss
from sparsesolve.core.patterns import NM, Unstructured
from sparsesolve.core.solvers import LayerProblem, cg_refit, reconstruction_error, refit, refit_by_cost, sparsegpt


def relative_gap(result: object, exact: object) -> float:
    return (result.error - exact.error) / exact.error


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.8), NM(2, 4), NM(3, 4)], ids=str)
@pytest.mark.parametrize("damp", [0.01, 0.0])
def test_default_tolerance_is_within_1e4_of_the_exact_refit(pattern: object, damp: float) -> None:
    """From the masked dense weight (cold) and from SparseGPT's weights (warm), float64 and float32."""
    x = correlated_inputs(512, 48, seed=1)
    w = random_weight(40, 48, seed=2)
    h = x.T @ x
    mask = sparsegpt(w, h, pattern).mask
    exact = refit(w, h, mask, damp=damp)
    for dtype in (torch.float64, torch.float32):
        for start in (None, sparsegpt(w, h, pattern).weight):
            result = cg_refit(w.to(dtype), h.to(dtype), mask, damp=damp, start=None if start is None else start.to(dtype))
            assert relative_gap(result, exact) <= 1e-4, (dtype, start is None, relative_gap(result, exact))
            assert not bool(result.weight[~mask].any())
            assert 0 < result.info["cg_iterations"] <= 100 and result.info["cg_residual"] <= 3e-4


def test_converged_cg_matches_cvxpy_with_a_target() -> None:
    x = correlated_inputs(256, 24, seed=3)
    w = random_weight(12, 24, seed=4)
    targets = torch.tanh(x @ w.T) * 3
    mask = NM(2, 4).project(w.abs())
    result = cg_refit(torch.zeros_like(w), x.T @ x, mask, target=targets.T @ x, damp=0.0, tol=1e-12, max_iter=500)
    expected = cvxpy_refit(x.numpy(), targets.numpy(), mask.numpy(), 0.0, np.zeros(w.shape))
    np.testing.assert_allclose(result.weight.numpy(), expected, rtol=1e-6, atol=1e-7 * np.abs(expected).max())


def test_objective_never_increases_and_warm_start_counts() -> None:
    """Each iteration lowers the objective (a descent method); from the exact answer no work is left."""
    x = correlated_inputs(400, 32, seed=5)
    w = random_weight(20, 32, seed=6)
    h, mask = x.T @ x, Unstructured(0.6).project(w.abs())
    errors = [cg_refit(w, h, mask, max_iter=k, tol=1e-14).error for k in range(12)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:])), errors
    exact = refit(w, h, mask)
    from_exact = cg_refit(w, h, mask, start=exact.weight)
    assert from_exact.info["cg_iterations"] <= 1
    assert relative_gap(from_exact, exact) <= 1e-10


def test_refit_by_cost_chooses_exact_small_and_cg_wide() -> None:
    x = correlated_inputs(300, 64, seed=7)
    w = random_weight(8, 64, seed=8)
    h, mask = x.T @ x, NM(2, 4).project(w.abs())
    assert "cg_iterations" not in refit_by_cost(w, h, mask).info
    wide = torch.ones(2, 4096, dtype=torch.bool)
    wide[:, ::2] = False  # 2048 kept inputs: (2048^3 / 3) > 20 * 2 * 4096^2
    result = refit_by_cost(torch.randn(2, 4096, dtype=torch.float64), torch.eye(4096, dtype=torch.float64), wide)
    assert "cg_iterations" in result.info


def test_bad_arguments() -> None:
    w, h = torch.randn(3, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="mask must be a bool"):
        cg_refit(w, h, torch.ones(3, 4))
    with pytest.raises(ValueError, match="tol > 0"):
        cg_refit(w, h, torch.ones(3, 4, dtype=torch.bool), tol=0.0)


def test_solver_options_reach_the_solver_not_the_refit() -> None:
    """``blocksize`` is SparseGPT's; the coordinator's refits take only ``damp`` (it used to raise TypeError)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(ss.GatedMLP(16, 48)).double()
    x = correlated_inputs(512, 16, seed=9)
    plain = ss.prune(copy.deepcopy(model), x, method="sparsellm", pattern="2:4", iterations=1)
    blocked = ss.prune(copy.deepcopy(model), x, method="sparsellm", pattern="2:4", iterations=1,
                       solver_options={"blocksize": 8, "damp": 0.01})
    assert blocked.error < blocked.start_error and plain.error < plain.start_error


def test_reported_error_and_reference_match_direct_products() -> None:
    """The refit's error comes from the tracked ``W Hd`` and the reference from ``C``: both equal the
    direct ``tr((W - W*) H (W - W*)^T)`` and ``tr(W* H W*^T)``."""
    x = correlated_inputs(300, 32, seed=10)
    w = random_weight(16, 32, seed=11)
    targets = torch.tanh(x @ w.T)
    problem = LayerProblem.build(w, x.T @ x, target=targets.T @ x, damp=0.01)
    result = cg_refit(w, x.T @ x, NM(2, 4).project(w.abs()), problem=problem, max_iter=3)
    assert result.error == pytest.approx(reconstruction_error(result.weight, problem.w_star, problem.gram), rel=1e-9)
    assert result.reference == pytest.approx(float(((problem.w_star @ problem.gram) * problem.w_star).sum()), rel=1e-9)
