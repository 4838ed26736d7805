"""Damped Cholesky factorisations that never fail silently.

Every solver factors a Gram matrix ``H = X^T X`` (``n x n``, or a batch of them). ``H`` is often
singular (fewer tokens than inputs, dead inputs, duplicated features), so a ridge ``lam * I`` is added
with ``lam = damp * mean(diag H)``. When the factorisation still fails (numerically indefinite), the
ridge is raised tenfold until it succeeds, and the number of escalations is reported to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DampedCholesky", "damped_cholesky", "compute_dtype_for", "check_finite", "plus_diagonal", "without_dead_inputs"]

MAX_ESCALATIONS = 12


@dataclass
class DampedCholesky:
    """Lower Cholesky factor ``L`` of ``H + lam I`` (batched like ``H``), with the damping used.

    ``lam`` has the batch shape of ``H`` (a 0-d tensor for a single matrix); ``escalations`` counts the
    tenfold increases beyond the requested damping that were needed (0 in the normal case).
    """

    factor: torch.Tensor
    lam: torch.Tensor
    escalations: int

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(H + lam I)^{-1} rhs`` for ``rhs`` of shape ``(..., n, k)``."""
        return torch.cholesky_solve(rhs, self.factor)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``tensor`` holds NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf: check the model weights and calibration inputs")


def compute_dtype_for(tensor: torch.Tensor, requested: torch.dtype | None = None) -> torch.dtype:
    """Solve dtype: ``requested`` if given, float64 for float64 inputs, float32 otherwise (fp16/bf16 too)."""
    if requested is not None:
        if requested not in (torch.float32, torch.float64):
            raise ValueError(f"compute dtype must be float32 or float64, got {requested}")
        return requested
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def damped_cholesky(gram: torch.Tensor, damp: float, *, check: bool = True) -> DampedCholesky:
    """Factor ``gram + lam I`` with ``lam = damp * mean(diag gram)``, escalating ``lam`` x10 on failure.

    ``gram`` is ``(..., n, n)`` symmetric positive semi-definite; each matrix of a batch escalates on
    its own. A zero mean diagonal (all inputs dead) uses a unit scale. Raises ``ValueError`` for
    non-finite input (unless ``check=False``: the caller built ``gram`` from checked data) and
    ``torch.linalg.LinAlgError`` if even the largest damping fails.
    """
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if check:
        check_finite("Gram matrix", gram)
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(dim=-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    lam = damp * scale
    # The first escalation jumps to a ridge that factors any PSD matrix in practice.
    floor = scale * (1e-10 if gram.dtype == torch.float64 else 1e-6)
    escalations = 0
    factor, info = torch.linalg.cholesky_ex(plus_diagonal(gram, lam) if damp > 0 else gram)
    while bool((info > 0).any()):
        if escalations >= MAX_ESCALATIONS:
            raise torch.linalg.LinAlgError(
                f"Cholesky failed even with damping {float(lam.max()):.3g}: the Gram matrix is not PSD"
            )
        failed = info > 0
        lam = torch.where(failed, torch.maximum(lam * 10, floor), lam)
        escalations += 1
        retry, retry_info = torch.linalg.cholesky_ex(plus_diagonal(gram, lam))
        factor = torch.where(failed[..., None, None], retry, factor)
        info = torch.where(failed, retry_info, info)
    return DampedCholesky(factor, lam, escalations)


def plus_diagonal(gram: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``gram + lam I`` (``(..., n, n)``, ``lam`` of the batch shape) as one new matrix: no identity
    matrix is built, which at a 7B FFN width would be one more ``n x n`` array at the peak."""
    out = gram.clone()
    torch.diagonal(out, dim1=-2, dim2=-1).add_(lam[..., None])
    return out


def without_dead_inputs(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gram`` (``n x n``) with every dead input (``H_jj <= 0``: never active on the calibration
    tokens) decoupled: its row and column zero, its diagonal 1, so the factorisation sees an identity
    block there; and the dead inputs as a bool vector (``n``). Their weights get no information from
    the data: the solvers set them to zero. ``gram`` itself is returned when no input is dead (no
    copy: callers never write into it), a decoupled copy otherwise."""
    dead = torch.diagonal(gram) <= 0
    h = gram
    if bool(dead.any()):
        h = gram.clone()
        h[dead, :] = 0
        h[:, dead] = 0
        h[dead, dead] = 1
    return h, dead
