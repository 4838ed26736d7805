"""Llama family (Llama, Mistral, Qwen2, SmolLM2): grouped-query attention and a gated FFN.

Layer ``l``: ``self_attn.{q,k,v}_proj`` read the normed hidden state, ``self_attn.o_proj`` the
attention output; the FFN is ``down_proj(act(gate_proj x) * up_proj x)`` with ``act`` from
``config.hidden_act`` (SiLU).
"""

from __future__ import annotations

from torch import nn

from sparsesolve.core.activations import get_activation
from sparsesolve.core.chain import Chain, DenseStage, GatedStage, LinearMap
from sparsesolve.lm.adapters.base import Adapter, DecoderLayerMap, activation_from_config


class LlamaAdapter(Adapter):
    """Adapter for ``LlamaForCausalLM`` and its architectural twins."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """``model.model.layers``."""
        return model.model.layers

    def layer_map(self, model: nn.Module, index: int) -> DecoderLayerMap:
        """q/k/v, then o; FFN up/gate (gated stage), then down."""
        layer, prefix = self.layers(model)[index], f"model.layers.{index}"
        attn, mlp = layer.self_attn, layer.mlp

        def linear(parent: nn.Module, path: str, name: str) -> LinearMap:
            return LinearMap(f"{prefix}.{path}.{name}", getattr(parent, name))

        attention = [[linear(attn, "self_attn", n) for n in ("q_proj", "k_proj", "v_proj")],
                     [linear(attn, "self_attn", "o_proj")]]
        ffn = Chain([
            GatedStage(linear(mlp, "mlp", "up_proj"), linear(mlp, "mlp", "gate_proj"),
                       activation_from_config(model.config.hidden_act)),
            DenseStage(linear(mlp, "mlp", "down_proj"), get_activation("identity")),
        ])
        return DecoderLayerMap(attention, ffn, mlp)
