"""The researcher's entry point: ``sparsesolve.prune``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsesolve.chain import Chain
from sparsesolve.coordinator import ChainResult, prune_chain
from sparsesolve.linalg import check_finite
from sparsesolve.patterns import Pattern, parse_pattern
from sparsesolve.solvers import SOLVERS

METHODS = ("sparsellm", *SOLVERS)


def resolve_pattern(sparsity: float | str | None, pattern: Pattern | str | None) -> Pattern:
    """Exactly one of ``sparsity`` (unstructured fraction) or ``pattern`` (``"2:4"``, ``Pattern``...)."""
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity= (e.g. 0.7) or pattern= (e.g. '2:4')")
    return parse_pattern(pattern if pattern is not None else sparsity)


def prune(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    method: str = "sparsellm",
    sparsity: float | str | None = None,
    pattern: Pattern | str | None = None,
    **options: Any,
) -> ChainResult:
    """Prune ``model`` in place and return the per-layer solutions, objective history and timings.

    - ``model``: an ``nn.Sequential`` of ``Linear`` / ``GatedMLP`` and elementwise activations.
    - ``calibration``: inputs of the model, ``N x in_features`` (tokens or samples as rows).
    - ``method``: ``"sparsellm"`` coordinates the whole chain against the dense output of the last
      layer; ``"magnitude" | "wanda" | "sparsegpt" | "admm"`` prune layer by layer, each layer
      reconstructing its own dense weight from the already-pruned inputs.
    - ``sparsity`` (fraction of zeros per row) or ``pattern`` (``"2:4"``, ``"70%"``, a ``Pattern``).
    - ``options``: ``solver_options`` (dict for the per-layer solver, e.g. ``{"damp": 0.01}``),
      ``chunk_size``; for sparsellm also ``solver``, ``iterations``, ``alpha``, ``beta``, ``gamma``,
      ``reselect_mask``, ``storage_dtype``, ``progress`` (see ``coordinator.sparsellm``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    chosen = resolve_pattern(sparsity, pattern)
    chain = Chain.from_module(model)
    width = chain.linears[0].weight.shape[1]
    if calibration.dim() != 2 or calibration.shape[0] == 0 or calibration.shape[1] != width:
        raise ValueError(
            f"calibration must be a non-empty N x {width} tensor (the model's inputs), "
            f"got shape {tuple(calibration.shape)}"
        )
    check_finite("calibration", calibration)
    with torch.no_grad():
        return prune_chain(chain, calibration, chosen, method=method, **options)
