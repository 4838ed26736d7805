"""Model adapters: ``get_adapter(model)`` picks an explicit one by ``config.model_type`` (llama, opt, gpt2:
their results are pinned by the P1 benchmarks) and otherwise discovers the structure (``discovered``)."""

from __future__ import annotations

from torch import nn

from sparsesolve.lm.adapters.base import Adapter, DecoderLayerMap, ExpertsMap
from sparsesolve.lm.adapters.discovered import DiscoveredAdapter, DiscoveryError
from sparsesolve.lm.adapters.gpt2 import GPT2Adapter
from sparsesolve.lm.adapters.llama import LlamaAdapter
from sparsesolve.lm.adapters.opt import OPTAdapter

__all__ = ["Adapter", "DecoderLayerMap", "ExpertsMap", "ADAPTERS", "DISCOVERED", "get_adapter", "explicit_model_types"]

ADAPTERS: dict[str, Adapter] = {t: a for a in (LlamaAdapter(), OPTAdapter(), GPT2Adapter()) for t in a.model_types}
#: the adapter of every other model type
DISCOVERED = DiscoveredAdapter()


def explicit_model_types() -> list[str]:
    """Every ``config.model_type`` an explicit adapter handles."""
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (a transformers causal LM): explicit, or discovered; a model whose
    structure discovery does not understand is refused with a one-line reason."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    try:
        DISCOVERED.layer_map(model, 0)
    except DiscoveryError as error:
        raise ValueError(f"model type {model_type!r} is not supported: {error}") from None
    return DISCOVERED
