"""Model-family adapters; ``get_adapter(model)`` picks one by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from sparsesolve.lm.adapters.base import Adapter, DecoderLayerMap
from sparsesolve.lm.adapters.gpt2 import GPT2Adapter
from sparsesolve.lm.adapters.llama import LlamaAdapter
from sparsesolve.lm.adapters.opt import OPTAdapter

__all__ = ["Adapter", "DecoderLayerMap", "ADAPTERS", "get_adapter", "supported_model_types"]

ADAPTERS: dict[str, Adapter] = {t: a for a in (LlamaAdapter(), OPTAdapter(), GPT2Adapter()) for t in a.model_types}


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` an adapter handles."""
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (a transformers causal LM); one-line error for unknown families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}")
    return ADAPTERS[model_type]
