"""The researcher's entry point: ``sparsesolve.prune``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from sparsesolve.core import distributed
from sparsesolve.core.chain import Chain
from sparsesolve.core.config import PruneConfig, SparseLLMConfig
from sparsesolve.core.coordinator import ChainResult, prune_chain
from sparsesolve.core.linalg import check_finite
from sparsesolve.core.patterns import Pattern
from sparsesolve.lm.decoder import PruneResult, prune_decoder

__all__ = ["prune", "prune_config"]

_PRUNE_FIELDS = {f.name for f in dataclasses.fields(PruneConfig)}
_SPARSELLM_FIELDS = {f.name for f in dataclasses.fields(SparseLLMConfig)}


def prune_config(method: str = "sparsellm", sparsity: float | str | None = None, pattern: Pattern | str | None = None,
                 *, language_model: bool = True, **options: Any) -> PruneConfig:
    """A ``PruneConfig`` from keyword options: ``PruneConfig`` fields as they are, ``SparseLLMConfig``
    fields (``iterations``, ``alpha`` ...) on top of the defaults of what is pruned; exactly one of
    ``sparsity`` (e.g. 0.7) and ``pattern`` (e.g. ``"2:4"``). An unknown option is a one-line error."""
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity= (e.g. 0.7) or pattern= (e.g. '2:4')")
    unknown = sorted(set(options) - _PRUNE_FIELDS - _SPARSELLM_FIELDS)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; options: {', '.join(sorted(_PRUNE_FIELDS - {'pattern', 'method'}))}, "
                         f"and for sparsellm {', '.join(sorted(_SPARSELLM_FIELDS))}")
    coordinator = {k: options.pop(k) for k in list(options) if k in _SPARSELLM_FIELDS}
    if coordinator:
        if method != "sparsellm":
            raise ValueError(f"options {sorted(coordinator)} apply to method 'sparsellm' only")
        base = options.pop("sparsellm", None) or (SparseLLMConfig.for_language_models() if language_model else SparseLLMConfig())
        options["sparsellm"] = SparseLLMConfig.with_options(base, coordinator)
    return PruneConfig(pattern=pattern if pattern is not None else sparsity, method=method, **options)


def prune(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    method: str = "sparsellm",
    sparsity: float | str | None = None,
    pattern: Pattern | str | None = None,
    config: PruneConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> ChainResult | PruneResult:
    """Prune ``model`` in place and return the per-layer solutions, objective history and timings.

    - ``model``: a transformers decoder-only causal LM (Llama family, OPT, GPT-2), pruned layer by layer
      (``lm.decoder.prune_decoder``; returns a ``PruneResult``), or an ``nn.Sequential`` of ``Linear`` /
      ``GatedMLP`` and elementwise activations (returns a ``ChainResult``).
    - ``calibration``: for a language model, token ids ``n_windows x seq_len``
      (``sparsesolve.lm.data.calibration_windows``); for a chain, its inputs ``N x in_features``.
    - ``method``: ``"sparsellm"`` coordinates the whole chain (the FFN of each decoder layer) against
      its dense output; ``"magnitude" | "wanda" | "sparsegpt" | "admm"`` prune layer by layer, each
      layer reconstructing its own dense weight from the already-pruned inputs.
    - ``sparsity`` (fraction of zeros per row) or ``pattern`` (``"2:4"``, ``"70%"``, a ``Pattern``).
    - ``config``: a whole ``PruneConfig`` instead of ``method``, ``sparsity``/``pattern`` and ``options``.
    - ``options``: ``PruneConfig`` fields (``solver``, ``solver_options``, ``layers``, ``batch_size``,
      ``storage_dtype``, ``device``, ``chunk_size``, ``quantizer``) and, for sparsellm, ``SparseLLMConfig``
      fields (``iterations``, ``alpha``, ...) over the defaults of what is pruned.
    - ``checkpoint_dir``, ``resume``: per-layer checkpoints of a language model (``prune_decoder``).
    - ``progress``: bars (default: on for language models, off for chains).

    Under an initialised ``torch.distributed`` process group with several ranks, each rank passes its
    own share of the calibration (``sparsesolve.core.distributed.share``) and the run is token sharded:
    every rank ends with the weights one process would compute from all shares (README, "Beyond one
    device").
    """
    language_model = isinstance(model, PreTrainedModel)
    if config is None:
        config = prune_config(method, sparsity, pattern, language_model=language_model, **options)
    elif options or sparsity is not None or pattern is not None:
        raise ValueError("give either config= or method/sparsity/pattern and options, not both")
    if language_model:
        return prune_decoder(model, calibration, config, checkpoint_dir=checkpoint_dir, resume=resume,
                             progress=True if progress is None else progress)
    if checkpoint_dir is not None:
        raise ValueError("checkpoint_dir applies to language models (layer-by-layer runs) only")
    if config.allocation != "uniform":
        raise ValueError(f"allocation {config.allocation!r} spreads sparsity over decoder layers; a chain is pruned "
                         "at one sparsity (leave allocation='uniform')")
    chain = Chain.from_module(model)
    width = chain.linears[0].weight.shape[1]
    if calibration.dim() != 2 or calibration.shape[1] != width:
        raise ValueError(
            f"calibration must be an N x {width} tensor (the model's inputs), "
            f"got shape {tuple(calibration.shape)}"
        )
    check_finite("calibration", calibration)
    for lin in chain.linears:
        config.pattern.validate(tuple(lin.weight.shape))
    with torch.no_grad(), distributed.token_sharded():
        return prune_chain(chain, calibration, config, progress=bool(progress))
