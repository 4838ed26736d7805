"""Each auxiliary update of the coordinator equals the minimiser of its subproblem, computed independently:
cvxpy for the convex ones (ridge activation update, identity prox, gated up-branch), a fine 1-D grid for
the non-convex elementwise ones (ReLU, SiLU, GELU, tanh, sigmoid prox; the gate of a gated FFN)."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from conftest import correlated_inputs
from torch import nn

from sparsesolve.core.activations import ACTIVATIONS, get_activation
from sparsesolve.core.chain import Chain, GatedMLP
from sparsesolve.core.coordinator import CoordinatorState

ALPHA, GAMMA = 0.7, 1.9


def fine_search(f: object, m: torch.Tensor, radius: torch.Tensor, points: int = 400_001) -> torch.Tensor:
    """Elementwise minimum of ``f`` over a uniform grid of ``points`` on ``[m - radius, m + radius]``."""
    best = torch.full_like(m, float("inf"))
    for i in range(m.numel()):
        grid = torch.linspace(float(m[i] - radius[i]), float(m[i] + radius[i]), points, dtype=torch.float64)
        best[i] = f(grid, i).min()
    return best


def sample_prox_problem(seed: int, size: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(size, generator=g, dtype=torch.float64), 2 * torch.randn(size, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", [n for n in ACTIVATIONS if n != "identity"])
def test_prox_is_global_minimiser(name: str) -> None:
    act = get_activation(name)
    m, a = sample_prox_problem(1)
    z = act.prox(m, a, ALPHA, GAMMA)
    ours = act.objective(z, m, a, ALPHA, GAMMA)
    radius = torch.sqrt(act.objective(m, m, a, ALPHA, GAMMA) / ALPHA) + 1e-9
    best = fine_search(lambda grid, i: act.objective(grid, m[i], a[i], ALPHA, GAMMA), m, radius)
    assert (ours <= best + 1e-9 * (1 + best.abs())).all(), (ours - best).max()


def test_gate_prox_with_scale_is_global_minimiser() -> None:
    """The gate update ``argmin alpha (s - m)^2 + gamma (p - silu(s) u)^2`` with large up values ``u``."""
    act = get_activation("silu")
    m, p = sample_prox_problem(2)
    u = 40 * torch.randn(m.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = act.prox(m, p, ALPHA, GAMMA, scale=u)
    ours = act.objective(s, m, p, ALPHA, GAMMA, u)
    radius = torch.sqrt(act.objective(m, m, p, ALPHA, GAMMA, u) / ALPHA) + 1e-9
    best = fine_search(lambda grid, i: act.objective(grid, m[i], p[i], ALPHA, GAMMA, u[i]), m, radius)
    assert (ours <= best + 1e-9 * (1 + best.abs())).all()


def test_identity_prox_matches_cvxpy() -> None:
    m, a = sample_prox_problem(4)
    c = torch.randn(m.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    z = cp.Variable(m.numel())
    cp.Problem(cp.Minimize(ALPHA * cp.sum_squares(z - m.numpy()) + GAMMA * cp.sum_squares(a.numpy() - cp.multiply(c.numpy(), z)))).solve()
    ours = get_activation("identity").prox(m, a, ALPHA, GAMMA, scale=c)
    np.testing.assert_allclose(ours.numpy(), z.value, rtol=1e-6, atol=1e-7)


def test_gated_up_update_matches_cvxpy() -> None:
    """``u = argmin alpha ||u - m_u||^2 + gamma ||p - silu(s) u||^2`` given ``s`` (convex in ``u``)."""
    x = correlated_inputs(5, 8, seed=6)
    block = GatedMLP(8, 12, bias=True).double()
    stage = Chain.from_module(block).stages[0]
    m_u, m_s = block.up(x).detach(), block.gate(x).detach()
    p = torch.randn(m_u.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    s = m_s + 0.3
    u_new, _ = stage.prox([m_u, m_s], [m_u, s], p, ALPHA, GAMMA)
    sigma = torch.nn.functional.silu(s).numpy()
    u = cp.Variable(m_u.shape)
    cp.Problem(cp.Minimize(ALPHA * cp.sum_squares(u - m_u.numpy()) + GAMMA * cp.sum_squares(p.numpy() - cp.multiply(sigma, u)))).solve()
    np.testing.assert_allclose(u_new.numpy(), u.value, rtol=1e-6, atol=1e-7)


def _state(module: nn.Module, x: torch.Tensor, beta: float) -> CoordinatorState:
    return CoordinatorState(Chain.from_module(module), x, torch.float64, torch.float64, None, ALPHA, beta, GAMMA)


@pytest.mark.parametrize("shape", ["expanding", "gated", "contracting"])
def test_activation_ridge_update_matches_cvxpy(shape: str) -> None:
    """``a_l = argmin w sum_j ||t_j - a W_j^T - b_j||^2 + gamma ||a - psi(z_l)||^2`` (cvxpy); the next
    stage wider than ``a_l`` (factored in ``a``'s space), gated (two linears stacked), narrower (factored
    in the next stage's output space)."""
    torch.manual_seed(8)
    if shape == "gated":
        module = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), GatedMLP(8, 10, bias=True), nn.Linear(8, 4)).double()
    elif shape == "expanding":
        module = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 10), nn.SiLU(), nn.Linear(10, 4)).double()
    else:
        module = nn.Sequential(nn.Linear(6, 12), nn.SiLU(), nn.Linear(12, 3)).double()
    x = correlated_inputs(7, 6, seed=8)
    beta = 2.3
    state = _state(module, x, beta)
    chain = state.chain
    weights = [[lin.weight + 0.1 * torch.randn_like(lin.weight) for lin in stage.linears] for stage in chain.stages]
    for p in state.pres[0]:
        p += torch.randn_like(p)  # move the auxiliaries away from the dense forward
    state.update_activation(0, weights)
    nxt = chain.stages[1]
    psi = chain.stages[0].activate(state.pres[0]).numpy()
    a = cp.Variable(psi.shape)
    w = beta if len(chain.stages) == 2 else ALPHA
    fit = sum(cp.sum_squares(t.numpy() - a @ wj.numpy().T - lin.bias.numpy())
              for lin, wj, t in zip(nxt.linears, weights[1], state.stage_targets(1)))
    cp.Problem(cp.Minimize(w * fit + GAMMA * cp.sum_squares(a - psi))).solve(canon_backend=cp.SCIPY_CANON_BACKEND)
    np.testing.assert_allclose(state.acts[0].numpy(), a.value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("local_steps", [None, 1, 6], ids=["global", "local-1", "local-6"])
def test_objective_decreases_along_auxiliary_updates(local_steps: int | None) -> None:
    torch.manual_seed(9)
    module = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 5)).double()
    state = _state(module, correlated_inputs(64, 6, seed=9), 1.0)
    weights = [[0.7 * lin.weight for lin in stage.linears] for stage in state.chain.stages]
    values = [state.objective(weights)]
    for l in (1, 0):
        state.update_activation(l, weights)
        values.append(state.objective(weights))
        state.update_preactivation(l, weights, local_steps)
        values.append(state.objective(weights))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.9 * values[0]


@pytest.mark.parametrize("name", ["silu", "gelu", "tanh"])
def test_local_prox_is_a_descent_step(name: str) -> None:
    """The fast local update: never worse than the current iterate with any number of Newton steps,
    strictly better on most elements, six steps better in total than one; started at the global
    search's answer it keeps (or improves) it."""
    act = get_activation(name)
    m, a = sample_prox_problem(4, size=200)
    u = 10 * torch.randn(m.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    start = m + torch.randn(m.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    f_start = act.objective(start, m, a, ALPHA, GAMMA, u)
    values = {}
    for steps in (1, 6):
        z = act.prox(m, a, ALPHA, GAMMA, scale=u, start=start, steps=steps)
        values[steps] = act.objective(z, m, a, ALPHA, GAMMA, u)
        assert (values[steps] <= f_start + 1e-12).all()
    assert (values[1] < f_start).float().mean() > 0.5
    assert values[6].sum() < values[1].sum()
    exact = act.prox(m, a, ALPHA, GAMMA, scale=u)
    kept = act.prox(m, a, ALPHA, GAMMA, scale=u, start=exact)
    assert (act.objective(kept, m, a, ALPHA, GAMMA, u) <= act.objective(exact, m, a, ALPHA, GAMMA, u) + 1e-12).all()



def test_global_gate_prox_is_never_worse_than_the_current_iterate() -> None:
    """Large up values (around 40) narrow the gate's basins below the grid spacing; with the current
    iterate as a candidate (here a 4001-point grid minimum) the global search cannot end above it."""
    g = torch.Generator().manual_seed(0)
    n, alpha, gamma = 4000, 1.0, 1.0
    m, a = 3 * torch.randn(n, generator=g, dtype=torch.float64), 5 * torch.randn(n, generator=g, dtype=torch.float64)
    up = 40 + 5 * torch.randn(n, generator=g, dtype=torch.float64)
    act = get_activation("silu")
    radius = torch.sqrt(act.objective(m, m, a, alpha, gamma, up) / alpha)
    grid = m[:, None] + radius[:, None] * torch.linspace(-1, 1, 4001, dtype=torch.float64)[None, :]
    values = act.objective(grid, m[:, None], a[:, None], alpha, gamma, up[:, None])
    current = torch.gather(grid, 1, values.argmin(dim=1, keepdim=True))[:, 0]
    f_current = act.objective(current, m, a, alpha, gamma, up)
    without = act.objective(act.prox(m, a, alpha, gamma, scale=up), m, a, alpha, gamma, up)
    assert float(((without - f_current) / f_current).max()) > 0.05  # the case: the search alone misses a basin
    z = act.prox(m, a, alpha, gamma, scale=up, candidate=current)
    assert bool((act.objective(z, m, a, alpha, gamma, up) <= f_current).all())
