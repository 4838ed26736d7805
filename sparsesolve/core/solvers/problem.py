"""The per-layer masked least-squares problem and the result every solver returns.

Problem (REFERENCE.md, "The subproblem")::

    min_W  ||W X - T||^2     s.t.  W is zero off the mask chosen by the pattern

with ``W`` of shape ``(m, n)``, inputs ``X`` of shape ``(n, N)`` given through their Gram matrix
``H = X X^T`` (``n x n``) and the target through its cross-covariance ``C = T X^T`` (``m x n``).
Any target reduces to reconstructing a dense weight: with ``W* = C (H + lam I)^{-1}``,
``||W X - T||^2 = ||(W - W*) X||^2 + const``; with no target, ``W* = weight`` (``T = weight X``).
So every solver works on ``(W*, H)``; the error it reports is ``tr((W - W*) H (W - W*)^T)``.

Conventions shared by all solvers:
- ``damp``: ridge ``lam = damp * mean(diag H)`` added to ``H`` wherever it is factored (SparseGPT's
  0.01 by default); escalated tenfold when a factorisation fails, and reported.
- Dead inputs (``H_jj = 0``, the input is always zero) get ``H_jj = 1`` and a zero weight column:
  their weights cannot matter, so they are the first to be pruned.
- Computation happens in float32, or float64 when the weight is float64, whatever the model dtype.
- Every solver takes ``problem=``: a ``LayerProblem`` already built for the same weight, Gram and
  target (then those arguments and ``damp`` are not read again): the SparseLLM coordinator builds one
  per linear and hands it to the mask-choosing solver and then to the refit, factoring once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsesolve.core.linalg import DampedCholesky, check_finite, compute_dtype_for, damped_cholesky, plus_diagonal, without_dead_inputs
from sparsesolve.core.quantize import QuantizationGrid

__all__ = ["LayerProblem", "LayerSolution", "reconstruction_error"]


def reconstruction_error(weight: torch.Tensor, w_star: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr((W - W*) H (W - W*)^T) = ||(W - W*) X||_F^2`` for ``W, W*`` of shape ``(m, n)``."""
    delta = weight - w_star
    return float(((delta @ gram) * delta).sum())


@dataclass
class LayerProblem:
    """A masked least-squares problem reduced to ``(W*, H)``, with its damped factor.

    Attributes: ``w_star`` (m x n) the dense weight to reconstruct, ``gram`` (n x n) the undamped
    Gram matrix (dead diagonal set to 1), ``cholesky`` the factor of ``gram + lam I``, ``dead`` the
    boolean mask of dead inputs, ``out_dtype`` the dtype of the weight handed in.
    """

    w_star: torch.Tensor
    gram: torch.Tensor
    cholesky: DampedCholesky
    dead: torch.Tensor
    out_dtype: torch.dtype
    started: float = field(default_factory=time.perf_counter)
    _reference: float | None = field(default=None, repr=False)
    _rhs: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        weight: torch.Tensor,
        gram: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        damp: float = 0.01,
        compute_dtype: torch.dtype | None = None,
        anchor: torch.Tensor | None = None,
    ) -> LayerProblem:
        """Validate shapes and values, cast, handle dead inputs, factor once and reduce the target.

        With a ``target`` the damping ``lam ||W||^2`` pulls toward zero; an ``anchor`` ``W0`` (``m x n``)
        centres it there instead, ``lam ||W - W0||^2``: the cross-covariance becomes ``T X^T + lam W0``,
        so ``W* = (T X^T + lam W0) (H + lam I)^-1`` (no extra factorisation). Without a target the
        damping is already centred on ``weight``."""
        started = time.perf_counter()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        m, n = weight.shape
        if tuple(gram.shape) != (n, n):
            raise ValueError(f"Gram matrix must be {n} x {n} for a weight with {n} inputs, got {tuple(gram.shape)}")
        if target is not None and tuple(target.shape) != (m, n):
            raise ValueError(f"target cross-covariance T X^T must be {m} x {n}, got {tuple(target.shape)}")
        if anchor is not None and (target is None or tuple(anchor.shape) != (m, n)):
            raise ValueError(f"an anchor needs a target and the weight's shape {m} x {n}, got "
                             f"{None if anchor is None else tuple(anchor.shape)}")
        dtype = compute_dtype_for(weight, compute_dtype)
        check_finite("weight", weight)
        h, dead = without_dead_inputs(gram.to(dtype))
        chol = damped_cholesky(h, damp)
        if target is None:
            w_star = weight.to(dtype).clone()
        else:
            check_finite("target", target)
            target = target.to(dtype) if anchor is None else target.to(dtype) + chol.lam * anchor.to(dtype)
            w_star = chol.solve(target.T).T.contiguous()
        w_star[:, dead] = 0
        rhs = None if target is None else target.masked_fill(dead, 0.0)
        return cls(w_star, h, chol, dead, weight.dtype, started, _rhs=rhs)

    @property
    def damped_gram(self) -> torch.Tensor:
        """``H + lam I`` as factored (the matrix the damped solvers actually minimise with), a new
        ``n x n`` array: ``damped_product`` applies it without one."""
        return plus_diagonal(self.gram, self.cholesky.lam)

    def damped_product(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight (H + lam I) = weight H + lam weight`` for ``weight`` of shape ``(m, n)``: one product
        and no ``n x n`` copy of ``H``."""
        return torch.addmm(weight, weight, self.gram, beta=float(self.cholesky.lam))

    @property
    def rhs(self) -> torch.Tensor:
        """``W* (H + lam I)`` (``m x n``): the target's cross-covariance itself when one was given."""
        if self._rhs is None:
            self._rhs = self.damped_product(self.w_star)
        return self._rhs

    @property
    def reference(self) -> float:
        """``||W* X||^2 = tr(W* H W*^T)``, computed once per problem; with a target ``W* H = C - lam W*``
        (``W* Hd = C``), so no product is needed."""
        if self._reference is None:
            if self._rhs is not None:
                self._reference = float((self.w_star * (self._rhs - self.cholesky.lam * self.w_star)).sum())
            else:
                self._reference = float(((self.w_star @ self.gram) * self.w_star).sum())
        return self._reference

    def solution(
        self, weight: torch.Tensor, mask: torch.Tensor, iterations: int = 1, escalations: int = 0,
        started: float | None = None, error: float | None = None, **info: Any
    ) -> LayerSolution:
        """Package a pruned weight: zero it off ``mask``, compute its error (unless the solver knows it:
        ``error``), stop the clock (started at ``started``, default when the problem was built).

        ``escalations`` counts damping escalations of factorisations beyond the problem's own.
        """
        weight = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
        if not bool(torch.isfinite(weight).all()):
            raise FloatingPointError("solver produced NaN or Inf weights; raise damp or use float64")
        return LayerSolution(
            weight=weight.to(self.out_dtype),
            mask=mask,
            error=reconstruction_error(weight, self.w_star, self.gram) if error is None else error,
            reference=self.reference,
            damping=float(self.cholesky.lam),
            escalations=self.cholesky.escalations + escalations,
            iterations=iterations,
            seconds=time.perf_counter() - (self.started if started is None else started),
            info=dict(info),
        )


@dataclass
class LayerSolution:
    """Result of one per-layer solve (in the spirit of ``scipy.optimize.OptimizeResult``).

    - ``weight`` (m x n, the input weight's dtype), zero wherever ``mask`` is False.
    - ``mask`` (m x n bool, True = kept).
    - ``error`` = ``||(W - W*) X||^2`` and ``reference`` = ``||W* X||^2``; ``relative_error`` is their ratio.
    - ``damping`` the ridge ``lam`` used, ``escalations`` how often it had to be raised tenfold.
    - ``iterations`` (1 for one-pass solvers), ``seconds`` wall time, ``info`` solver-specific extras.
    - ``grid``: the quantisation grid the kept weights lie on (a quantising solve), else None.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    error: float
    reference: float
    damping: float
    escalations: int
    iterations: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    grid: QuantizationGrid | None = None

    @property
    def relative_error(self) -> float:
        """``||(W - W*) X||^2 / ||W* X||^2`` (0 for a zero reference)."""
        return self.error / self.reference if self.reference > 0 else 0.0

    @property
    def sparsity(self) -> float:
        """Achieved fraction of zeros in the mask."""
        return float((~self.mask).sum()) / self.mask.numel()
