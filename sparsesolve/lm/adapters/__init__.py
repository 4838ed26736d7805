"""Model adapters: ``get_adapter(model)`` discovers any decoder-only model's structure (``discovered``);
a new explicit adapter file belongs here only for a family discovery cannot read exactly."""

from __future__ import annotations

from torch import nn

from sparsesolve.lm.adapters.base import Adapter, DecoderLayerMap, ExpertsMap
from sparsesolve.lm.adapters.discovered import DiscoveredAdapter, DiscoveryError

__all__ = ["Adapter", "DecoderLayerMap", "ExpertsMap", "DISCOVERED", "get_adapter"]

#: the adapter of every model type
DISCOVERED = DiscoveredAdapter()


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (a transformers causal LM); a model whose structure discovery does not
    understand is refused with a one-line reason."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        DISCOVERED.layer_map(model, 0)
    except DiscoveryError as error:
        raise ValueError(f"model type {model_type!r} is not supported: {error}") from None
    return DISCOVERED
