"""Annealed masked decay (AST's annealed SR-STE) on the pruned entries of the dense master weights.

    lambda(t) = lambda_max * min(1, t / T0)

grows from 0 over the first ``T0`` steps (the mask explores early) and is then held (it settles
late). Two forms: added to the gradient, ``g <- g + lambda(t) (~M * W)`` before the optimiser step
(paper: lambda_max about 6e-5), or added to the Adam-normalised update, ``W <- W - lr lambda(t)
(~M * W)`` after it (about 1e-4). Masks are boolean, so ``~M`` is the pruned set: the released GPT-2
code stored masks as int32, where ``~`` is a bitwise NOT (-1 / -2) and the term decayed every weight.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sparsesolve.retrain.sparse_linear import SparseLinear

__all__ = ["annealed_lambda", "masked_decay_gradient_", "masked_decay_update_"]


def annealed_lambda(step: int, lambda_max: float, warmup_steps: int) -> float:
    """``lambda_max * min(1, step / warmup_steps)`` (``lambda_max`` from the start if ``warmup_steps`` is 0)."""
    if warmup_steps <= 0:
        return lambda_max
    return lambda_max * min(1.0, step / warmup_steps)


def _pruned_part(layer: SparseLinear) -> torch.Tensor:
    """``~M * W`` (``out x in``); refuses non-boolean masks."""
    if layer.mask.dtype != torch.bool:
        raise TypeError(f"masks must be boolean (got {layer.mask.dtype}): ~mask of an integer mask decays every weight")
    return layer.weight_out_in().detach() * ~layer.mask


@torch.no_grad()
def masked_decay_gradient_(layers: Iterable[SparseLinear], lam: float) -> None:
    """Gradient form: ``grad(W) += lam * (~M * W)`` (call after ``backward``, before the optimiser step)."""
    for layer in layers:
        grad = layer.module.weight.grad
        if grad is not None:
            (grad.T if layer.transposed else grad).add_(_pruned_part(layer), alpha=lam)


@torch.no_grad()
def masked_decay_update_(layers: Iterable[SparseLinear], lam: float, lr: float) -> None:
    """Update form: ``W -= lr * lam * (~M * W)`` (call after the optimiser step)."""
    for layer in layers:
        layer.weight_out_in().sub_(_pruned_part(layer), alpha=lr * lam)
