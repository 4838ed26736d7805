"""What an adapter tells the driver about one decoder layer of a model family.

An adapter knows module names and nothing about solvers: it lists the decoder layers and, for each,
the attention linears in true-sequence groups (each group shares one input, e.g. ``[q, k, v]`` then
``[o]``), the FFN as a ``Chain`` and the module whose forward input is the FFN's input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn

from sparsesolve.core.chain import Chain, LinearMap

__all__ = ["HF_ACTIVATIONS", "DecoderLayerMap", "ExpertsMap", "Adapter"]

#: transformers activation names -> ours (only exact equivalents; discovery checks them against the trace).
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "relu2": "relu2",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python": "gelu",
    "gelu_accurate": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "linear": "identity",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
}


@dataclass
class ExpertsMap:
    """Routed experts: the module called as ``experts(hidden, top_k_index, top_k_weights)`` and one chain
    per expert (views into its 3-D parameters); expert ``e``'s output is weighted by the router's weight."""

    name: str
    module: nn.Module
    chains: list[Chain]

    @property
    def linears(self) -> list[LinearMap]:
        """Every expert's linears, expert by expert."""
        return [lin for chain in self.chains for lin in chain.linears]


@dataclass
class DecoderLayerMap:
    """The prunable parts of one decoder layer.

    - ``attention``: groups of linears in true sequence; the linears of a group read the same input.
    - ``ffn``: the dense feed-forward block as a chain (its output is reconstructed); in an MoE layer the
      shared expert, or None.
    - ``ffn_input``: the module whose (first positional) forward input is the FFN input.
    - ``experts``: routed experts (MoE layers), else None.
    """

    attention: list[list[LinearMap]]
    ffn: Chain | None
    ffn_input: nn.Module | None
    experts: ExpertsMap | None = None

    @property
    def linears(self) -> list[LinearMap]:
        """Every prunable linear of the layer: attention, then the FFN, then the experts."""
        return ([lin for group in self.attention for lin in group] + (self.ffn.linears if self.ffn else [])
                + (self.experts.linears if self.experts else []))


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
