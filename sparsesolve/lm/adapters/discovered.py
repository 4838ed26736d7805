"""Any decoder-only transformers model: the decoder layers, attention groups and FFN chains found by a trace.

Discovery runs the model once on 16 token ids with hooks on every linear module of the decoder layers
(``nn.Linear`` and GPT-2-style ``Conv1D``) and on every routed-experts module (transformers' fused
experts: ``gate_up_proj`` ``E x 2F x D`` and ``down_proj`` ``E x D x F``, called with the tokens, their
top-k expert indices and weights). Per decoder layer:

1. The FFN block is where the last linear of the layer sits (the layer's child module holding it, or the
   layer's own linear children when it has no FFN module: OPT's ``fc1, fc2``); with routed experts, the
   module holding them. Router linears (``E`` or 1 outputs, named ``*gate`` / ``*router``) stay dense.
2. Every other linear is attention; linears are grouped by the input tensor they read, in call order:
   ``[q, k, v]`` (or a fused ``qkv``), then ``[o]``: true sequence, each group pruned on the outputs of
   the pruned groups before it.
3. The FFN linears form two groups, ``A`` (read the FFN input) then ``B`` (one linear): ``A`` one linear
   is ``B(act(A x))``; two linears are gated ``B(act(gate x) * up x)``; one linear with twice ``B``'s
   inputs is a fused gate/up, split into its halves for the coordinator and written back in place. The
   activation comes from the config (``hidden_act``, ``hidden_activation``, ``activation_function``)
   mapped to an exactly equivalent ``Activation``; every candidate structure is checked against the
   traced output of ``B`` (relative error below 1e-4) and the first exact one is taken.
4. Routed experts become one chain per expert (views into the 3-D parameters), checked by recomputing the
   experts module's traced output from the chains and the router's weights.

A model whose layers, FFN or experts match none of this is refused with what was not understood.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsesolve.core.activations import ACTIVATIONS, Activation, get_activation
from sparsesolve.core.chain import Chain, DenseStage, GatedStage, LinearMap
from sparsesolve.lm.adapters.base import HF_ACTIVATIONS, Adapter, DecoderLayerMap, ExpertsMap

__all__ = ["DiscoveredAdapter", "DiscoveryError"]

#: how close a candidate FFN or expert structure must reproduce the traced output (relative, float32)
EXACT = 1e-4
#: tolerance of a half-precision trace in units of its dtype's rounding (``_tolerance``)
ROUNDING = 4
#: submodules of multimodal models that token ids never reach (their layers are not the decoder's)
_TOWERS = {"vision_tower", "vision_model", "visual", "vision", "image_encoder", "audio_tower", "audio_model",
           "vision_encoder", "vqmodel", "vq_model"}


class DiscoveryError(ValueError):
    """The model's structure was not understood (the message says what)."""


@dataclass
class _Call:
    name: str            # relative to the decoder layer
    module: nn.Module
    inputs: tuple[Any, ...]   # as passed (their identity groups the linears that read one tensor)
    values: tuple[Any, ...]   # copies taken at the call: a layer may later change its tensors in place
    output: torch.Tensor


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None
                                             and module.weight.dim() == 2)


def _is_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return "down_proj" in params and params["down_proj"].dim() == 3 and (
        "gate_up_proj" in params or "up_proj" in params)


def _layer_count(config: Any) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: of the ``nn.ModuleList``s of blocks that hold linear modules, the one with one
    entry per configured layer (else any) holding the most parameters."""
    count = _layer_count(model.config)
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and not _is_linear(m[0])
             and any(_is_linear(x) for x in m[0].modules()) and not _TOWERS.intersection(name.lower().split("."))]
    found = [item for item in lists if len(item[1]) == count] or lists
    if not found:
        raise DiscoveryError(f"no list of decoder layers holding linear modules found in {type(model).__name__}")
    return max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _activation_names(config: Any) -> list[str]:
    names = []
    for source in (config, getattr(config, "text_config", None)):
        for key in ("hidden_act", "hidden_activation", "activation_function", "activation", "act_fn"):
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, str) and value not in names:
                names.append(value)
    return names


def _activations(config: Any) -> list[Activation]:
    """The config's activation as ours; a config that names none: every one of ours, as candidates that
    the trace check must confirm (BLOOM's FFN hard-codes tanh-GELU)."""
    names = _activation_names(config)
    if not names:
        return [a for name, a in ACTIVATIONS.items() if name != "identity"]
    mapped = [get_activation(HF_ACTIVATIONS[n]) for n in names if n in HF_ACTIVATIONS]
    if not mapped:
        raise DiscoveryError(f"activation {', '.join(names)} has no exact equivalent; supported: "
                             f"{', '.join(sorted(HF_ACTIVATIONS))}")
    return mapped


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (infinite where ``a`` is not finite): how far a candidate
    structure's output ``a`` is from the traced output ``b``."""
    a, b = a.double(), b.double().to(a.device)
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return float((a - b).norm()) / max(float(b.norm()), 1e-12)


def _tolerance(traced: torch.Tensor) -> float:
    """The largest ``_gap`` accepted for the best candidate: ``EXACT``, or ``ROUNDING`` units of the traced
    dtype's rounding for a half-precision trace (a bfloat16 Llama FFN is 0.4 % off its float64 chain)."""
    return max(EXACT, ROUNDING * torch.finfo(traced.dtype).eps) if traced.is_floating_point() else EXACT


def _closest(scored: list[tuple[float, Any]], traced: torch.Tensor) -> Any:
    """The candidate of ``(gap, candidate)`` pairs with the smallest gap, or None when even that one is
    beyond the trace's ``_tolerance``. The closest wins rather than the first within tolerance: under
    bfloat16's rounding the first could be a near miss (ReLU for a tanh-GELU FFN with large
    pre-activations is 2-4 % off)."""
    if not scored:
        return None
    gap, best = min(scored, key=lambda pair: pair[0])
    return best if gap <= _tolerance(traced) else None


def _groups(calls: list[_Call]) -> list[list[_Call]]:
    """Calls grouped by the input tensor they read, in call order."""
    groups: list[list[_Call]] = []
    for call in calls:
        for group in groups:
            if group[0].inputs[0] is call.inputs[0]:
                group.append(call)
                break
        else:
            groups.append([call])
    return groups


def _map(prefix: str, call: _Call, **view: Any) -> LinearMap:
    transposed = not isinstance(call.module, nn.Linear)
    name = f"{prefix}.{call.name}"
    return LinearMap(name + view.pop("suffix", ""), call.module, transposed=transposed, path=name, **view)


def _dense_chain(prefix: str, calls: list[_Call], activations: list[Activation]) -> Chain:
    """The FFN chain of ``calls`` (module docstring, step 3), checked against the traced output."""
    groups = _groups(calls)
    if len(groups) != 2 or len(groups[1]) != 1:
        raise DiscoveryError(f"FFN linears {', '.join(c.name for c in calls)} do not form 'A then B' "
                             f"({len(groups)} input groups)")
    first, (last,) = groups
    x, target = first[0].values[0], last.output
    width = last.module.weight.shape[1 if isinstance(last.module, nn.Linear) else 0]
    down = DenseStage(_map(prefix, last), get_activation("identity"))
    candidates: list[Callable[[Activation], Chain]] = []
    if len(first) == 1:
        a = first[0]
        out = _map(prefix, a).weight.shape[0]
        if out == width:
            candidates.append(lambda act: Chain([DenseStage(_map(prefix, a), act), down]))
        elif out == 2 * width and isinstance(a.module, nn.Linear):
            for gate_rows, up_rows in ((slice(0, width), slice(width, out)), (slice(width, out), slice(0, width))):
                candidates.append(lambda act, g=gate_rows, u=up_rows: Chain([GatedStage(
                    _map(prefix, a, rows=u, suffix=f"[{u.start}:{u.stop}]"),
                    _map(prefix, a, rows=g, suffix=f"[{g.start}:{g.stop}]"), act), down]))
    elif len(first) == 2:
        for up, gate in ((first[0], first[1]), (first[1], first[0])):
            candidates.append(lambda act, u=up, g=gate: Chain([GatedStage(_map(prefix, u), _map(prefix, g), act), down]))
    scored = []
    with torch.no_grad():
        for build in candidates:
            for act in activations:
                chain = build(act)
                scored.append((_gap(chain.forward(x.reshape(-1, x.shape[-1]).double()), target.reshape(-1, target.shape[-1])), chain))
    closest = _closest(scored, target)
    if closest is not None:
        return closest
    raise DiscoveryError(f"FFN {', '.join(c.name for c in calls)} is not B(act(A x)) or B(act(gate x) * up x) with "
                         f"activation {', '.join(a.name for a in activations)}")


def _experts(prefix: str, call: _Call, activations: list[Activation]) -> ExpertsMap:
    """One chain per expert of a fused experts module, checked against its traced output."""
    module, path = call.module, f"{prefix}.{call.name}"
    hidden, index, weights = (call.values + (None, None, None))[:3]
    if not (isinstance(index, torch.Tensor) and isinstance(weights, torch.Tensor)):
        raise DiscoveryError(f"{path} is not called as experts(hidden, top_k_index, top_k_weights)")
    down = module.down_proj
    transposed = down.shape[1] != hidden.shape[-1]  # stored E x F x D (x @ W) instead of E x D x F
    count, width = down.shape[0], down.shape[1 if transposed else 2]
    fused = getattr(module, "gate_up_proj", None)

    def view(label: str, param: str, e: int, rows: slice | None = None) -> LinearMap:
        return LinearMap(f"{path}.{param}[{e}]{label}", module, transposed=transposed, param=param, index=e, rows=rows,
                         path=path)

    def expert(e: int, act: Activation) -> Chain:
        out = DenseStage(view("", "down_proj", e), get_activation("identity"))
        if fused is None:
            return Chain([DenseStage(view("", "up_proj", e), act), out])
        up, gate = view(".up", "gate_up_proj", e, slice(width, 2 * width)), view(".gate", "gate_up_proj", e, slice(0, width))
        return Chain([GatedStage(up, gate, act), out])

    x = hidden.reshape(-1, hidden.shape[-1]).double()
    scored = []
    for act in activations:
        chains = [expert(e, act) for e in range(count)]
        total = torch.zeros(x.shape[0], hidden.shape[-1], dtype=torch.float64, device=x.device)
        try:
            with torch.no_grad():
                for e, chain in enumerate(chains):
                    rows, slot = torch.nonzero(index.reshape(x.shape[0], -1) == e, as_tuple=True)
                    if len(rows):
                        scale = weights.reshape(x.shape[0], -1)[rows, slot].double().unsqueeze(1)
                        total.index_add_(0, rows, scale * chain.forward(x[rows]))
        except RuntimeError:  # shapes of another layout
            break
        scored.append((_gap(total, call.output.reshape(total.shape)), chains))
    closest = _closest(scored, call.output)
    if closest is not None:
        return ExpertsMap(path, module, closest)
    raise DiscoveryError(f"experts {path} are not sum_k w_k down_k(act(gate_k x) * up_k x) in the fused [gate; up] "
                         "layout with the config's activation")


def _is_router(call: _Call, experts: int | None) -> bool:
    """A router (one output per expert) or a shared expert's scalar gate: kept dense."""
    out = call.module.weight.shape[0] if isinstance(call.module, nn.Linear) else call.module.weight.shape[1]
    leaf = call.name.rsplit(".", 1)[-1]
    return "router" in call.name or out == experts or (leaf.endswith("gate") and out == 1)


class DiscoveredAdapter(Adapter):
    """The adapter of every model type (module docstring)."""

    def __init__(self) -> None:
        self._maps: weakref.WeakKeyDictionary[nn.Module, list[DecoderLayerMap]] = weakref.WeakKeyDictionary()

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers (``find_layers``)."""
        return find_layers(model)[1]

    def layer_map(self, model: nn.Module, index: int) -> DecoderLayerMap:
        """Layer ``index``'s groups and chains (discovered once per model, then cached)."""
        if model not in self._maps:
            self._maps[model] = self._discover(model)
        return self._maps[model][index]

    def _discover(self, model: nn.Module) -> list[DecoderLayerMap]:
        if getattr(model.config, "is_encoder_decoder", False):
            raise DiscoveryError("an encoder-decoder model, not decoder-only")
        path, layers = find_layers(model)
        calls = self._trace(model, layers)
        activations = _activations(model.config)
        experts = next((getattr(model.config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                        if isinstance(getattr(model.config, k, None), int)), None)
        return [self._layer(f"{path}.{i}", calls[i], activations, experts) for i in range(len(layers))]

    @staticmethod
    def _trace(model: nn.Module, layers: nn.ModuleList) -> list[list[_Call]]:
        calls: list[list[_Call]] = [[] for _ in layers]
        handles = []
        for i, layer in enumerate(layers):
            for name, module in layer.named_modules():
                if _is_linear(module) or _is_experts(module):
                    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any, i: int = i, name: str = name) -> None:
                        values = tuple(args) + tuple(v for v in kwargs.values() if isinstance(v, torch.Tensor))
                        out = output[0] if isinstance(output, tuple) else output
                        copies = tuple(v.detach().clone() if isinstance(v, torch.Tensor) else v for v in values)
                        calls[i].append(_Call(name, mod, values, copies, out.detach().clone()))
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
        vocab = getattr(model.config, "vocab_size", None) or getattr(getattr(model.config, "text_config", None), "vocab_size", 64)
        ids = (torch.arange(16).reshape(2, 8) * 7 + 3) % min(int(vocab), 1000)
        try:
            with torch.no_grad():
                model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return calls

    @staticmethod
    def _layer(prefix: str, calls: list[_Call], activations: list[Activation], experts: int | None) -> DecoderLayerMap:
        if not calls:
            raise DiscoveryError(f"{prefix} calls no linear module")
        names = [c.name for c in calls]
        if len(set(names)) != len(names):
            raise DiscoveryError(f"{prefix} calls one of its linears twice ({names}); its structure is not a sequence")
        routed = [c for c in calls if _is_experts(c.module)]
        last = routed[-1] if routed else [c for c in calls if not _is_router(c, experts)][-1]
        block = last.name.rsplit(".", 1)[0] if "." in last.name else ""
        if routed:
            block = block.rsplit(".", 1)[0] if block.endswith("experts") and "." in block else block

        def in_block(call: _Call) -> bool:
            return call.name.startswith(block + ".") if block else "." not in call.name

        linears = [c for c in calls if not _is_experts(c.module) and not _is_router(c, experts)]
        ffn_calls = [c for c in linears if in_block(c)]
        attention_calls = [c for c in linears if not in_block(c)]
        attention = [[_map(prefix, c) for c in group] for group in _groups(attention_calls)]
        ffn = _dense_chain(prefix, ffn_calls, activations) if ffn_calls else None
        ffn_input = ffn_calls[0].module if ffn_calls else None
        expert_map = _experts(prefix, routed[0], activations) if routed else None
        if len(routed) > 1:
            raise DiscoveryError(f"{prefix} has {len(routed)} experts modules; one is understood")
        if ffn is None and expert_map is None:
            raise DiscoveryError(f"{prefix} has no FFN linears")
        return DecoderLayerMap(attention, ffn, ffn_input, expert_map)
