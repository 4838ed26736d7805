"""AST retraining of semi-structured (N:M) models (Adaptive Sparse Trainer, arXiv 2407.20584).

- ``sparse_linear``: ``SparseLinear``, a dense master weight trained through a boolean mask with a
  straight-through gradient, periodic magnitude mask refresh with flip-rate accounting, and SLoRB
  (``slorb``) extra low-rank parameters.
- ``decay``: the annealed masked decay on pruned weights (update and gradient forms); ``optimizer``:
  ``MaskedAdamW``, AdamW taking the update form's term into its second moment and update.
- ``distill``: the distillation loss against a frozen dense teacher.
- ``start``: the student (warm start from a one-shot output folder, or dense weights with magnitude masks).
- ``loop``: ``retrain``, the training loop (one process or torchrun), ``RetrainConfig`` its settings.
"""

from sparsesolve.retrain.decay import annealed_lambda, decay_terms, masked_decay_gradient_
from sparsesolve.retrain.distill import distillation_loss
from sparsesolve.retrain.loop import RetrainConfig, retrain
from sparsesolve.retrain.optimizer import MaskedAdamW
from sparsesolve.retrain.slorb import SLoRB, load_slorb
from sparsesolve.retrain.sparse_linear import SparseLinear, sparse_linears, wrap_linears
from sparsesolve.retrain.start import sparse_student

__all__ = ["MaskedAdamW", "RetrainConfig", "SLoRB", "SparseLinear", "annealed_lambda", "decay_terms", "distillation_loss",
           "load_slorb", "masked_decay_gradient_", "retrain", "sparse_linears", "sparse_student",
           "wrap_linears"]
