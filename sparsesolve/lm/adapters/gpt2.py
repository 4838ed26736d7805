"""GPT-2: Conv1D linears (weights stored transposed, ``in x out``) and a GELU FFN.

Layer ``l`` of ``transformer.h``: ``attn.c_attn`` (q, k and v fused in one map), then ``attn.c_proj``;
the FFN is ``mlp.c_proj(gelu_new(mlp.c_fc x))``.
"""

from __future__ import annotations

from torch import nn

from sparsesolve.core.activations import get_activation
from sparsesolve.core.chain import Chain, DenseStage, LinearMap
from sparsesolve.lm.adapters.base import Adapter, DecoderLayerMap, activation_from_config


class GPT2Adapter(Adapter):
    """Adapter for ``GPT2LMHeadModel``."""

    model_types = ("gpt2",)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """``model.transformer.h``."""
        return model.transformer.h

    def layer_map(self, model: nn.Module, index: int) -> DecoderLayerMap:
        """c_attn, then c_proj; mlp.c_fc (GELU), then mlp.c_proj; every weight transposed."""
        layer, prefix = self.layers(model)[index], f"transformer.h.{index}"

        def conv(module: nn.Module, name: str) -> LinearMap:
            return LinearMap(f"{prefix}.{name}", module, transposed=True)

        attention = [[conv(layer.attn.c_attn, "attn.c_attn")], [conv(layer.attn.c_proj, "attn.c_proj")]]
        ffn = Chain([
            DenseStage(conv(layer.mlp.c_fc, "mlp.c_fc"), activation_from_config(model.config.activation_function)),
            DenseStage(conv(layer.mlp.c_proj, "mlp.c_proj"), get_activation("identity")),
        ])
        return DecoderLayerMap(attention, ffn, layer.mlp)
