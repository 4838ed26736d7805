"""Elementwise activations and the proximal update of their pre-activations.

The SparseLLM coordinator updates each pre-activation ``z`` (elementwise, every token independent) by

    z = argmin_z  alpha (z - m)^2 + gamma (a - c * phi(z))^2

where ``m`` is the linear map's current output, ``a`` the activation auxiliary and ``c`` a scale
(1 for a plain layer; the up-branch value ``u`` for the gate of a gated FFN). Closed forms exist for
the identity and ReLU (``c = 1``); any other activation gets a safeguarded 1-D solve: since
``f(z*) <= f(m)`` and ``f(z) >= alpha (z - m)^2``, the minimiser lies in ``[m - R, m + R]`` with
``R = sqrt(f(m) / alpha)``; a grid over that bracket finds the best basin (``f`` may be non-convex)
together with the roots of ``c * phi(z) = a`` on each monotone branch of ``phi`` (where ``|c|`` is
large that basin is narrower than any grid) gives starting points; safeguarded Newton steps, taken
only where ``f`` decreases, polish each, and the best wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsesolve.core.config import LOCAL_NEWTON_STEPS

__all__ = ["Activation", "ACTIVATIONS", "get_activation"]

GRID_POINTS = 9
NEWTON_STEPS = 6
HALVINGS = 4
LOCAL_HALVINGS = 2
POLISHED_STARTS = 2
#: elements per block of the proximal updates of smooth activations (identity and ReLU take one closed
#: form on the whole tensor): on a CPU blocks that stay in cache (about twice as fast as whole tensors);
#: on a GPU large blocks (a 7B layer's 1.4e9 gate elements in 22 launches of each operation) whose
#: temporaries stay at 256 MiB each instead of the whole tensor's 5.3 GiB
PROX_BLOCK = 2**18
PROX_BLOCK_DEVICE = 2**26
BISECTION_STEPS = 30


@dataclass(frozen=True)
class Activation:
    """An elementwise activation ``phi`` with its first two derivatives (for the proximal solve)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    d1: Callable[[torch.Tensor], torch.Tensor]
    d2: Callable[[torch.Tensor], torch.Tensor]
    valley: float | None = None  # argmin of phi for activations that dip below zero (SiLU, GELU)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z)

    def prox(
        self,
        m: torch.Tensor,
        a: torch.Tensor,
        alpha: float,
        gamma: float,
        scale: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
        steps: int = LOCAL_NEWTON_STEPS,
        candidate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Elementwise ``argmin_z alpha (z - m)^2 + gamma (a - scale * phi(z))^2`` (``scale`` = 1 if None).

        The global search (no ``start``) is exact for the identity and ReLU. For the others it returns
        a point no worse than any of its grid points and branch roots and than ``candidate`` (the
        current iterate, in the coordinator, so the objective cannot rise); it finds the global
        minimiser in practice, but where ``|scale|`` is large (gated up values of 40 and more) a basin can
        fall between the grid points, so this is not guaranteed.

        With ``start`` (the current iterate) a smooth activation takes the fast local update instead of
        the global search: ``steps`` safeguarded Newton steps from ``start`` (each halved at most
        ``LOCAL_HALVINGS`` times, taken only where ``f`` decreases). It is a descent step, not the global
        minimiser (nor, with few steps, a stationary point): never worse than ``start``, so the
        coordinator's objective still cannot increase, at a fraction of the cost of the grid and
        branch-root search.
        """
        if alpha <= 0 or gamma < 0:
            raise ValueError(f"prox needs alpha > 0 and gamma >= 0, got {alpha}, {gamma}")
        if self.name == "identity":
            c = torch.ones_like(m) if scale is None else scale
            return (alpha * m + gamma * c * a) / (alpha + gamma * c * c)
        if self.name == "relu" and scale is None:
            positive = ((gamma * a + alpha * m) / (gamma + alpha)).clamp_min(0)
            negative = m.clamp_max(0)
            return torch.where(
                self.objective(positive, m, a, alpha, gamma) <= self.objective(negative, m, a, alpha, gamma),
                positive,
                negative,
            )
        flat_m, flat_a = m.reshape(-1), a.reshape(-1)
        block = PROX_BLOCK if m.device.type == "cpu" else PROX_BLOCK_DEVICE
        flat_c = None if scale is None else scale.reshape(-1)
        out = torch.empty_like(flat_m)
        flat_start = None if start is None else start.reshape(-1)
        for first in range(0, flat_m.numel(), block):
            part = slice(first, first + block)
            c = None if flat_c is None else flat_c[part]
            if flat_start is None:
                current = None if candidate is None else candidate.reshape(-1)[part]
                out[part] = self._prox_search(flat_m[part], flat_a[part], alpha, gamma, c, current)
            else:
                local_c = torch.ones_like(flat_m[part]) if c is None else c
                out[part] = self._newton(flat_start[part], flat_m[part], flat_a[part], local_c, alpha, gamma, c,
                                         steps, LOCAL_HALVINGS)
        return out.reshape(m.shape)

    def objective(
        self,
        z: torch.Tensor,
        m: torch.Tensor,
        a: torch.Tensor,
        alpha: float,
        gamma: float,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``alpha (z - m)^2 + gamma (a - scale * phi(z))^2`` elementwise."""
        value = self.fn(z) if scale is None else scale * self.fn(z)
        return alpha * (z - m) ** 2 + gamma * (a - value) ** 2

    def _prox_search(
        self, m: torch.Tensor, a: torch.Tensor, alpha: float, gamma: float, scale: torch.Tensor | None,
        candidate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = torch.ones_like(m) if scale is None else scale
        f_m = self.objective(m, m, a, alpha, gamma, scale)
        radius = torch.sqrt(f_m / alpha)
        best, best_f = m.clone(), f_m
        for offset in torch.linspace(-1.0, 1.0, GRID_POINTS).tolist():
            z = m + offset * radius
            f = self.objective(z, m, a, alpha, gamma, scale)
            better = f < best_f
            best, best_f = torch.where(better, z, best), torch.where(better, f, best_f)
        # Where |c| is large the basin around c * phi(z) = a is narrower than the grid: the roots on
        # each monotone branch of phi are starting points too. Newton polishes the two best starts.
        level = torch.where(c != 0, a / torch.where(c != 0, c, torch.ones_like(c)), torch.zeros_like(a))
        extra = [] if candidate is None else [candidate]
        starts = torch.stack([best, *self._branch_roots(level), *extra])
        values = torch.stack([best_f] + [self.objective(z, m, a, alpha, gamma, scale) for z in starts[1:]])
        order = values.argsort(dim=0)[:POLISHED_STARTS]
        return self._polish(list(torch.gather(starts, 0, order)), best, best_f, m, a, alpha, gamma, scale)

    def _polish(self, starts: list[torch.Tensor], best: torch.Tensor, best_f: torch.Tensor, m: torch.Tensor,
                a: torch.Tensor, alpha: float, gamma: float, scale: torch.Tensor | None) -> torch.Tensor:
        """Newton from each start; elementwise, the lowest ``f`` among the results and ``best`` wins."""
        c = torch.ones_like(m) if scale is None else scale
        for start in starts:
            z = self._newton(start, m, a, c, alpha, gamma, scale, NEWTON_STEPS, HALVINGS)
            f = self.objective(z, m, a, alpha, gamma, scale)
            better = f < best_f
            best, best_f = torch.where(better, z, best), torch.where(better, f, best_f)
        return best

    def _newton(
        self, z: torch.Tensor, m: torch.Tensor, a: torch.Tensor, c: torch.Tensor, alpha: float, gamma: float,
        scale: torch.Tensor | None, steps: int, halvings: int,
    ) -> torch.Tensor:
        """``steps`` Newton steps on ``f``; a step is taken only where it lowers ``f`` (else halved, at most
        ``halvings`` times). On a CPU the halvings stop once every element has accepted its step; on a
        GPU all ``halvings`` run, so the loop never waits for the device (no host synchronisation)."""
        f_z = self.objective(z, m, a, alpha, gamma, scale)
        early_exit = z.device.type == "cpu"
        for _ in range(steps):
            phi, d1, d2 = self.fn(z), self.d1(z), self.d2(z)
            residual = a - c * phi
            grad = 2 * alpha * (z - m) - 2 * gamma * c * residual * d1
            hess = 2 * alpha + 2 * gamma * c * c * d1 * d1 - 2 * gamma * c * residual * d2
            step = torch.where(hess > 0, -grad / hess.clamp_min(1e-300), -grad / (2 * alpha))
            pending = torch.ones_like(z, dtype=torch.bool)
            for _ in range(halvings):
                trial = z + step
                f = self.objective(trial, m, a, alpha, gamma, scale)
                better = pending & (f < f_z)
                z, f_z = torch.where(better, trial, z), torch.where(better, f, f_z)
                pending &= ~better
                if early_exit and not bool(pending.any()):
                    break
                step = step / 2
        return z

    def _branch_roots(self, level: torch.Tensor) -> list[torch.Tensor]:
        """Points where ``phi(z) = level`` on each monotone branch (the nearest end where none exists).

        Increasing activations have one branch; SiLU and GELU also a decreasing one left of their
        minimum at ``valley``.
        """
        width = 20.0 + level.abs()
        pivot = torch.full_like(level, self.valley if self.valley is not None else 0.0)
        lo = pivot if self.valley is not None else pivot - width
        roots = [_bisect(self.fn, level, lo, pivot + width, increasing=True)]
        if self.valley is not None:
            roots.append(_bisect(self.fn, level, pivot - width, pivot, increasing=False))
        return roots


def _bisect(fn: Callable[[torch.Tensor], torch.Tensor], level: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
            increasing: bool) -> torch.Tensor:
    """Elementwise bisection for ``fn(z) = level`` on ``[lo, hi]`` where ``fn`` is monotone."""
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        above = (fn(mid) > level) if increasing else (fn(mid) < level)
        lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
    return 0.5 * (lo + hi)


def _sigmoid_parts(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.sigmoid(z)
    return s, s * (1 - s)


def _gelu_d1(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _gelu_d2(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (2 - z * z)


def _tanh_gelu(z: torch.Tensor) -> torch.Tensor:
    return F.gelu(z, approximate="tanh")


def _autograd_derivatives(fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Callable, Callable]:
    """First and second derivatives of an elementwise ``fn`` by automatic differentiation."""

    def d1(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = z.detach().requires_grad_(True)
            return torch.autograd.grad(fn(x).sum(), x)[0]

    def d2(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
            return torch.autograd.grad(g.sum(), x)[0]

    return d1, d2


def _silu_d1(z: torch.Tensor) -> torch.Tensor:
    s, ds = _sigmoid_parts(z)
    return s + z * ds


def _silu_d2(z: torch.Tensor) -> torch.Tensor:
    s, ds = _sigmoid_parts(z)
    return ds * (2 + z * (1 - 2 * s))


ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation("identity", lambda z: z, torch.ones_like, torch.zeros_like),
    "relu": Activation("relu", torch.relu, lambda z: (z > 0).to(z.dtype), torch.zeros_like),
    "relu2": Activation("relu2", lambda z: torch.relu(z) ** 2, lambda z: 2 * torch.relu(z), lambda z: 2 * (z > 0).to(z.dtype)),
    "silu": Activation("silu", F.silu, _silu_d1, _silu_d2, valley=-1.2784645427610738),
    "gelu": Activation("gelu", F.gelu, _gelu_d1, _gelu_d2, valley=-0.7517915246935645),
    "gelu_tanh": Activation("gelu_tanh", _tanh_gelu, *_autograd_derivatives(_tanh_gelu), valley=-0.7524614220710161),
    "tanh": Activation("tanh", torch.tanh, lambda z: 1 - torch.tanh(z) ** 2,
                       lambda z: -2 * torch.tanh(z) * (1 - torch.tanh(z) ** 2)),
    "sigmoid": Activation("sigmoid", torch.sigmoid, lambda z: _sigmoid_parts(z)[1],
                          lambda z: _sigmoid_parts(z)[1] * (1 - 2 * torch.sigmoid(z))),
}


def get_activation(name: str) -> Activation:
    """The activation called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}") from None
