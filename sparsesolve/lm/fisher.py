"""How much the language-model loss cares about each output row of each prunable linear: the diagonal
empirical Fisher of the loss with respect to the linear's outputs.

For one window of ``T`` tokens with summed next-token loss ``L`` and a linear's output ``y`` (``T x m``),
let ``g_ti = dL / dy_ti``. An error ``delta`` added to ``y`` changes the loss by about
``g . delta + 1/2 sum_ti g_ti^2 delta_ti^2`` (the empirical Fisher ``g g^T`` standing in for the Hessian,
its diagonal kept); the dense model sits near a minimum of the calibration loss, so the first term
averages out and, for an error uncorrelated with ``g`` over the tokens,

    dL ~ 1/2 sum_i f_i sum_t delta_ti^2,        f_i = mean over all windows' tokens of g_ti^2.

``output_fisher`` returns ``f`` (``m``, float64) per linear from one backward pass of the dense model
per batch of windows; parameters get no gradients (only activations do), so the memory is that of a
training step's activations, not its optimizer. The model runs where it lies (all of it must be there,
or dispatched across devices); token sharded runs sum the squares and counts over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional

from sparsesolve.core import distributed
from sparsesolve.core.chain import LinearMap
from sparsesolve.lm.adapters import Adapter

__all__ = ["FISHER_BATCH", "output_fisher"]

#: windows per backward pass when pruning: one. A backward pass holds a training step's activations
#: for its windows, and batching saved no time: SmolLM2, 16 windows of 512 tokens, two threads, took
#: 39.0 s and 9.8 GB of peak resident memory in batches of 8 against 35.9 s and 2.4 GB one at a time
FISHER_BATCH = 1


def output_fisher(model: nn.Module, adapter: Adapter, layers: Sequence[int], windows: torch.Tensor,
                  batch_size: int) -> dict[str, torch.Tensor]:
    """Per linear of the decoder ``layers`` (experts excluded, by ``LinearMap.name``), the mean squared
    gradient of the windows' summed next-token loss with respect to each output row (module docstring)."""
    linears = [lin for i in layers for lin in adapter.layer_map(model, i).linears if lin.index is None]
    modules = {id(lin.module): lin.module for lin in linears}      # a fused module backs several linears
    squares: dict[int, torch.Tensor] = {}
    handles = [module.register_forward_hook(_output_hook(squares, key)) for key, module in modules.items()]
    embedding = model.get_input_embeddings()
    handles.append(embedding.register_forward_hook(lambda module, args, out: out.requires_grad_()))
    trainable = {p: p.requires_grad for p in model.parameters()}
    device = embedding.weight.device
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad():
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start : start + batch_size].to(device)
                logits = model(input_ids=ids).logits
                loss = functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    tokens = distributed.reduce_count(windows.numel())
    totals = {key: distributed.reduce(squares[key]) for key in modules}     # once per module, same order on every rank
    return {lin.name: _rows(totals[id(lin.module)], lin) / max(tokens, 1) for lin in linears}


def _output_hook(squares: dict[int, torch.Tensor], key: int) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
    """A forward hook whose output's gradient adds its squares, summed over the tokens, to ``squares[key]``."""
    def accumulate(grad: torch.Tensor) -> None:
        part = grad.detach().reshape(-1, grad.shape[-1]).double().pow(2).sum(dim=0)
        squares[key] = part if key not in squares else squares[key].add_(part)

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(accumulate)
    return hook


def _rows(squares: torch.Tensor, lin: LinearMap) -> torch.Tensor:
    """The entries of a module's output ``squares`` that belong to ``lin`` (its ``rows`` block)."""
    return (squares if lin.rows is None else squares[lin.rows]).cpu()
