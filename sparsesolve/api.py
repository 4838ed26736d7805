"""The researcher's entry point: ``sparsesolve.prune``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from sparsesolve.chain import Chain
from sparsesolve.coordinator import ChainResult, prune_chain
from sparsesolve.decoder import PruneResult, prune_decoder
from sparsesolve.linalg import check_finite
from sparsesolve.patterns import Pattern, parse_pattern
from sparsesolve.solvers import SOLVERS

METHODS = ("sparsellm", *SOLVERS)
_SPARSELLM_OPTIONS = ("iterations", "alpha", "beta", "gamma", "reselect_mask", "refine", "refine_tol", "refine_iter",
                      "prox", "prox_steps", "trace")


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
) -> ChainResult | PruneResult:
    """Prune ``model`` in place and return the per-layer solutions, objective history and timings.

    - ``model``: a transformers decoder-only causal LM (Llama family, OPT, GPT-2), pruned layer by layer
      (``decoder.prune_decoder``; returns a ``PruneResult``), or an ``nn.Sequential`` of ``Linear`` /
      ``GatedMLP`` and elementwise activations (returns a ``ChainResult``).
    - ``calibration``: for a language model, token ids ``n_windows x seq_len``
      (``sparsesolve.data.calibration_windows``); for a chain, its inputs ``N x in_features``.
    - ``method``: ``"sparsellm"`` coordinates the whole chain (the FFN of each decoder layer) against
      its dense output; ``"magnitude" | "wanda" | "sparsegpt" | "admm"`` prune layer by layer, each
      layer reconstructing its own dense weight from the already-pruned inputs.
    - ``sparsity`` (fraction of zeros per row) or ``pattern`` (``"2:4"``, ``"70%"``, a ``Pattern``).
    - ``options``: ``solver_options`` (dict for the per-layer solver, e.g. ``{"damp": 0.01}``),
      ``chunk_size``; for sparsellm also ``solver``, ``iterations``, ``alpha``, ``beta``, ``gamma``,
      ``reselect_mask``, ``refine``, ``refine_tol``, ``refine_iter``, ``prox``, ``prox_steps``, ``storage_dtype``, ``progress`` (see
      ``coordinator.sparsellm``; language-model defaults ``decoder.DECODER_SPARSELLM_DEFAULTS``); for a
      language model also ``layers``, ``batch_size``, ``device``, ``checkpoint_dir``, ``resume``
      (see ``decoder.prune_decoder``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    chosen = resolve_pattern(sparsity, pattern)
    if isinstance(model, PreTrainedModel):
        coordinator = {k: options.pop(k) for k in _SPARSELLM_OPTIONS if k in options}
        return prune_decoder(model, calibration, chosen, method=method, sparsellm_options=coordinator, **options)
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
