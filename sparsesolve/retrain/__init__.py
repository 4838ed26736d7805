"""AST retraining of semi-structured (N:M) models (Adaptive Sparse Trainer, arXiv 2407.20584).

- ``config``: ``RetrainConfig``, the run's settings (no torch import).
- ``sparse_linear``: ``SparseLinear``, a dense master weight trained through a boolean mask with a
  straight-through gradient, periodic magnitude mask refresh with flip-rate accounting, and SLoRB
  (``sparsesolve.lm.slorb``, where loading reaches it) extra low-rank parameters.
- ``decay``: the annealed masked decay on pruned weights (update and gradient forms); ``optimizer``:
  ``MaskedAdamW``, AdamW taking the update form's term into its second moment and update.
- ``distill``: the distillation loss against a frozen dense teacher.
- ``start``: the student (warm start from a one-shot output folder, or dense weights with magnitude masks).
- ``loop``: ``retrain``, the training loop (one process or torchrun).

The names below load on first use, so reading ``retrain.config`` imports no torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "RetrainConfig": "config", "annealed_lambda": "decay", "decay_terms": "decay", "masked_decay_gradient_": "decay",
    "distillation_loss": "distill", "retrain": "loop", "MaskedAdamW": "optimizer", "SparseLinear": "sparse_linear",
    "sparse_linears": "sparse_linear", "wrap_linears": "sparse_linear", "sparse_student": "start",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsesolve.retrain' has no attribute {name!r}")
    value = getattr(import_module(f"sparsesolve.retrain.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
