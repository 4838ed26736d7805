"""What an adapter tells the driver about one decoder layer of a model family.

An adapter knows module names and nothing about solvers: it lists the decoder layers and, for each,
the attention linears in true-sequence groups (each group shares one input, e.g. ``[q, k, v]`` then
``[o]``), the FFN as a ``Chain`` and the module whose forward input is the FFN's input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn

from sparsesolve.core.activations import Activation, get_activation
from sparsesolve.core.chain import Chain, LinearMap

__all__ = ["DecoderLayerMap", "Adapter", "activation_from_config"]

#: transformers activation names -> ours (only exact equivalents).
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
}


def activation_from_config(name: str) -> Activation:
    """Our ``Activation`` for a transformers ``hidden_act`` / ``activation_function`` name."""
    if name not in _HF_ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(sorted(_HF_ACTIVATIONS))}")
    return get_activation(_HF_ACTIVATIONS[name])


@dataclass
class DecoderLayerMap:
    """The prunable parts of one decoder layer.

    - ``attention``: groups of linears in true sequence; the linears of a group read the same input.
    - ``ffn``: the feed-forward block as a chain (its output is reconstructed).
    - ``ffn_input``: the module whose (first positional) forward input is the FFN input.
    """

    attention: list[list[LinearMap]]
    ffn: Chain
    ffn_input: nn.Module

    @property
    def linears(self) -> list[LinearMap]:
        """Every prunable linear of the layer, attention first."""
        return [lin for group in self.attention for lin in group] + self.ffn.linears


class Adapter(ABC):
    """One model family: where the decoder layers are and how each maps onto prunable parts."""

    #: ``config.model_type`` values this adapter handles.
    model_types: tuple[str, ...] = ()

    @abstractmethod
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def layer_map(self, model: nn.Module, index: int) -> DecoderLayerMap:
        """The prunable parts of decoder layer ``index``, with full module names."""
