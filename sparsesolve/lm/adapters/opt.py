"""OPT: multi-head attention with biases and a ReLU FFN ``fc2(relu(fc1 x))``.

Layer ``l`` of ``model.decoder.layers``: ``self_attn.{q,k,v}_proj``, then ``self_attn.out_proj``;
``fc1`` reads the (pre- or post-layer-normed, depending on the model size) hidden state.
"""

from __future__ import annotations

from torch import nn

from sparsesolve.core.activations import get_activation
from sparsesolve.core.chain import Chain, DenseStage, LinearMap
from sparsesolve.lm.adapters.base import Adapter, DecoderLayerMap, activation_from_config


class OPTAdapter(Adapter):
    """Adapter for ``OPTForCausalLM``."""

    model_types = ("opt",)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """``model.model.decoder.layers``."""
        return model.model.decoder.layers

    def layer_map(self, model: nn.Module, index: int) -> DecoderLayerMap:
        """q/k/v, then out_proj; fc1 (activation from the config), then fc2."""
        layer, prefix = self.layers(model)[index], f"model.decoder.layers.{index}"
        attn = layer.self_attn
        attention = [[LinearMap(f"{prefix}.self_attn.{n}", getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")],
                     [LinearMap(f"{prefix}.self_attn.out_proj", attn.out_proj)]]
        ffn = Chain([
            DenseStage(LinearMap(f"{prefix}.fc1", layer.fc1), activation_from_config(model.config.activation_function)),
            DenseStage(LinearMap(f"{prefix}.fc2", layer.fc2), get_activation("identity")),
        ])
        return DecoderLayerMap(attention, ffn, layer.fc1)
