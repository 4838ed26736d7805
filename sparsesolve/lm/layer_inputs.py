"""The inputs of a decoder layer on the calibration windows, and running a layer over them.

``capture_first_inputs`` runs the model up to decoder layer 0 and keeps, per forward batch, the
layer's hidden states (``batch x seq x d``) and the keyword arguments the model passes (attention
mask, rotary embeddings, ...). ``run_layer`` runs a layer on one batch; ``feed`` runs it on every
batch until a given module is called and hands that module's input (``tokens x width``) on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LayerInputs", "StopForward", "capture_first_inputs", "feed", "run_layer"]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted input has been seen."""


@dataclass
class LayerInputs:
    """Per forward batch: a decoder layer's hidden states and the keyword arguments of its call."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


def capture_first_inputs(model: nn.Module, layer: nn.Module, windows: torch.Tensor, batch_size: int,
                         storage: torch.dtype, device: torch.device) -> LayerInputs:
    """Run ``model`` on ``windows`` (``batch_size`` at a time) up to ``layer`` and keep its inputs
    (hidden states in ``storage`` on ``device``)."""
    inputs = LayerInputs([], [])

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.hidden.append(hidden.detach().to(device=device, dtype=storage))
        # further positional arguments (RecurrentGemma passes position ids and mask so) travel by name
        names = list(inspect.signature(module.forward).parameters)[1:len(args)]
        inputs.kwargs.append({**dict(zip(names, args[1:])), **{k: v for k, v in kwargs.items() if k != "hidden_states"}})
        raise StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    model_device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(model_device), use_cache=False)
            except StopForward:
                continue
            raise RuntimeError("the first decoder layer was never called")
    finally:
        handle.remove()
    return inputs


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """The layer's output hidden states for one batch (computed in ``dtype``)."""
    out = layer(hidden.to(dtype), **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def feed(layer: nn.Module, module: nn.Module, inputs: LayerInputs, dtype: torch.dtype,
         consume: Callable[[torch.Tensor], None], *, every_argument: bool = False) -> None:
    """Run ``layer`` on every batch until ``module`` is called; hand its input (tokens x width) to
    ``consume`` (``every_argument``: all its tensor arguments, each as tokens x ..., as a tuple)."""

    def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        values = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        if every_argument:
            tokens = values[0].shape[:-1].numel()
            consume(tuple(v.detach().reshape(tokens, -1) for v in values))
        else:
            consume(values[0].detach().reshape(-1, values[0].shape[-1]))
        raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            try:
                run_layer(layer, hidden, kwargs, dtype)
            except StopForward:
                continue
            raise RuntimeError(f"{type(module).__name__} was not called by its decoder layer")
    finally:
        handle.remove()
