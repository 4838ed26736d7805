"""Annealed masked decay (AST's annealed SR-STE) on the pruned entries of the dense master weights.

    lambda(t) = lambda_max * min(1, t / T0),        d = lambda(t) * (~M * W)

grows from 0 over the first ``T0`` steps (the mask explores early) and is then held (it settles
late). Two forms, both with AdamW (``optimizer.MaskedAdamW``):

- ``"update"`` (the default; the paper's section 3.2 and its released optimizer, lambda_max about
  1e-4): ``d`` joins the Adam update before its normalisation. It enters the second moment
  ``v <- b2 v + (1 - b2) (g + d)^2`` and the numerator ``(m_hat + d) / (sqrt(v_hat) + eps)``, but not
  the first moment ``m``: the decay has Adam's step size (with no loss gradient a pruned weight moves
  by about ``lr`` per step) and no momentum, so a weight whose mask flips back is not pushed on.
- ``"gradient"`` (SR-STE's form, lambda_max about 6e-5): ``g <- g + d`` before the step, so ``d``
  also accumulates in the momentum, which the paper argues against; kept as the SR-STE baseline.

Masks are boolean, so ``~M`` is the pruned set: the released GPT-2 code stored masks as int32, where
``~`` is a bitwise NOT (-1 / -2) and the term decayed every weight (the kept ones twice as fast).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from sparsesolve.retrain.sparse_linear import SparseLinear

__all__ = ["annealed_lambda", "decay_terms", "masked_decay_gradient_"]


def annealed_lambda(step: int, lambda_max: float, warmup_steps: int) -> float:
    """``lambda_max * min(1, step / warmup_steps)`` (``lambda_max`` from the start if ``warmup_steps`` is 0)."""
    if warmup_steps <= 0:
        return lambda_max
    return lambda_max * min(1.0, step / warmup_steps)


def _pruned_part(layer: SparseLinear) -> torch.Tensor:
    """``~M * W`` in the module's own weight layout; refuses non-boolean masks."""
    if layer.mask.dtype != torch.bool:
        raise TypeError(f"masks must be boolean (got {layer.mask.dtype}): ~mask of an integer mask decays every weight")
    with torch.no_grad():
        pruned = layer.weight_out_in().detach() * ~layer.mask
    return pruned.T if layer.transposed else pruned


def decay_terms(layers: Iterable[SparseLinear], lam: float) -> dict[torch.nn.Parameter, Callable[[], torch.Tensor]]:
    """``{weight parameter: () -> lam * (~M * W)}`` for the update form (``MaskedAdamW.step(decay=...)``);
    each term is computed when the optimiser reaches its parameter, so one weight's copy exists at a time."""
    def term(layer: SparseLinear) -> Callable[[], torch.Tensor]:
        return lambda: _pruned_part(layer).mul_(lam)

    return {layer.module.weight: term(layer) for layer in layers}


@torch.no_grad()
def masked_decay_gradient_(layers: Iterable[SparseLinear], lam: float) -> None:
    """Gradient form: ``grad(W) += lam * (~M * W)`` (call after ``backward``, before the optimiser step)."""
    for layer in layers:
        grad = layer.module.weight.grad
        if grad is not None:
            grad.add_(_pruned_part(layer), alpha=lam)
