"""AST retraining of semi-structured (N:M) models (Adaptive Sparse Trainer, arXiv 2407.20584).

- ``sparse_linear``: ``SparseLinear``, a dense master weight trained through a boolean mask with a
  straight-through gradient, periodic magnitude mask refresh with flip-rate accounting, and SLoRB
  (``slorb``) extra low-rank parameters.
- ``decay``: the annealed masked decay on pruned weights (gradient and update forms).
- ``distill``: the distillation loss against a frozen dense teacher.
"""

from sparsesolve.retrain.decay import annealed_lambda, masked_decay_gradient_, masked_decay_update_
from sparsesolve.retrain.distill import distillation_loss
from sparsesolve.retrain.slorb import SLoRB
from sparsesolve.retrain.sparse_linear import SparseLinear, sparse_linears, wrap_linears

__all__ = ["SLoRB", "SparseLinear", "annealed_lambda", "distillation_loss", "masked_decay_gradient_",
           "masked_decay_update_", "sparse_linears", "wrap_linears"]
