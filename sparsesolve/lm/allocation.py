"""Layer-wise sparsity allocation: how sparse each decoder layer is, the model's average kept exact.

An unstructured target ``S`` can be spread unevenly over the ``L`` pruned decoder layers: layer ``l``
(``P_l`` prunable parameters) gets ``s_l`` with ``sum_l P_l s_l = S sum_l P_l``; ``spread`` bounds
how far the layers move (below). The statistics come from one dense pass over the calibration windows
before pruning (``layer_statistics``: each linear's input Gram ``H``, all-reduced when token sharded):

- ``"uniform"``: ``s_l = S`` (no pass).
- ``"owl"`` (outlier-weighted, Yin et al. 2024): the layer's outlier ratio ``D_l``, the share of its
  Wanda scores ``|W_ij| sqrt(H_jj)`` above ``OUTLIER_MULTIPLE`` times their mean, scaled linearly to
  ``[0, 2 spread]`` over the layers; the layers with more outliers are kept denser:
  ``1 - s_l = (D_l - min D) / (max D - min D) 2 spread + c``, ``c`` making the average exact (the
  sparsities span ``2 spread``, OWL's ``2 lambda``, not necessarily centred on ``S``).
- ``"obs"`` (this package's): each layer's error curve from optimal-brain-surgeon saliencies.
  Pruning weight ``ij`` alone, with the rest of its row compensating, costs ``W_ij^2 / [Hd^-1]_jj``
  (``Hd = H + damp mean(diag H) I``); a row at sparsity ``s`` costs about the sum of its
  ``round(s n)`` smallest saliencies. ``E_l(s)``, the sum over the layer's linears of that cost
  relative to ``||W X||^2``, is convex in ``s`` (sorted increments), so the allocation minimising
  ``sum_l E_l(s_l)`` under the budget is found by bisection on the multiplier ``mu`` of
  ``E_l(s) - mu P_l s`` over a grid of ``s`` within ``S +- spread``; a layer whose error rises slowly
  takes more zeros.
- ``"fisher"`` (this package's): the same curves in units of the language-model loss instead of each
  layer's own relative error. Row ``i`` of a linear weighs its squared output error by ``f_i``, the
  mean squared gradient of the calibration loss with respect to that output (``lm/fisher.py``: one
  backward pass of the dense model), so ``E_l(s) ~ sum_i f_i cost_i(s)`` estimates the loss increase of
  pruning layer ``l`` to ``s`` (second order, diagonal empirical Fisher); the same bisection splits the
  zeros. A layer whose errors the rest of the model absorbs (small ``f``) takes more zeros; ``"obs"``
  cannot see that.

With ``unit="linear"`` each linear of every chosen layer is its own unit: its own ``P``, outlier ratio
and curve, the same rules over all of them (a layer's curve is the sum of its linears' curves, so the
layer unit is the linear unit constrained to one sparsity per layer; the Fisher weights then also
split the zeros between, say, a layer's value and down projections). MoE experts are not covered.

Either way the sparsities are then shifted together (and clipped to their bounds) until the
parameter-weighted average is ``S`` to rounding (``_exact``). Experts of an MoE layer take their
layer's sparsity; the statistics read the layer's other linears.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsesolve.core import distributed
from sparsesolve.core.config import ALLOCATION_UNITS, ALLOCATIONS
from sparsesolve.core.linalg import damped_cholesky, without_dead_inputs
from sparsesolve.lm.adapters import Adapter
from sparsesolve.lm.layer_inputs import LayerInputs, run_layer

__all__ = ["ALLOCATIONS", "LayerStatistics", "allocate", "layer_statistics", "sparsity_grid"]

#: OWL's outlier threshold: a score above this multiple of the layer's mean score is an outlier (the
#: paper's M = 5 for LLaMA)
OUTLIER_MULTIPLE = 5.0
#: the sparsity grid step of the ``"obs"`` and ``"fisher"`` error curves
GRID_STEP = 0.0025
#: no layer is allocated more zeros than this fraction
MAX_SPARSITY = 0.99


@dataclass
class LayerStatistics:
    """One unit's dense statistics (a decoder layer's, or one linear's): ``params`` (its prunable
    parameters), ``outlier_ratio`` (OWL's ``D_l``) and ``errors`` (``E_l`` at ``grid``: the ``"obs"`` or
    ``"fisher"`` curve)."""

    params: int
    outlier_ratio: float
    grid: torch.Tensor
    errors: torch.Tensor


def layer_statistics(model: nn.Module, adapter: Adapter, layers: Sequence[int], inputs: LayerInputs,
                     dtype: torch.dtype, device: torch.device, grid: torch.Tensor, damp: float = 0.01,
                     row_weights: dict[str, torch.Tensor] | None = None,
                     unit: str = "layer") -> dict[int | str, LayerStatistics]:
    """Run the dense decoder over ``inputs`` (the first layer's, per batch; consumed) up to the last of
    ``layers`` and return the statistics (module docstring) at the sparsities ``grid`` of each chosen
    layer (by index) or, with ``unit="linear"``, of each of their linears (by name); with
    ``row_weights`` (per linear name, one weight per output row: ``"fisher"``) the error curves weigh each
    row's squared output error by them, else by ``1 / ||W X||^2`` (``"obs"``)."""
    if unit not in ALLOCATION_UNITS:
        raise ValueError(f"unit must be one of {', '.join(ALLOCATION_UNITS)}, got {unit!r}")
    decoder = adapter.layers(model)
    stats: dict[int | str, LayerStatistics] = {}
    for index in range(max(layers) + 1):
        layer = decoder[index]
        home = next(layer.parameters()).device
        layer.to(device)
        grams: dict[int, torch.Tensor] = {}
        handles = []
        if index in layers:
            every = adapter.layer_map(model, index).linears
            linears = [lin for lin in every if lin.index is None]
            for module in {id(lin.module): lin.module for lin in linears}.values():
                handles.append(module.register_forward_pre_hook(_gram_hook(grams, id(module))))
        try:
            inputs.hidden = [run_layer(layer, h, kw, dtype).to(h.dtype) for h, kw in zip(inputs.hidden, inputs.kwargs)]
        finally:
            for handle in handles:
                handle.remove()
        if index in layers:
            grams = {key: distributed.reduce(g) for key, g in grams.items()}
            if unit == "layer":
                stats[index] = _statistics(linears, grams, grid, damp, sum(lin.weight.numel() for lin in every), row_weights)
            else:
                stats.update({lin.name: _statistics([lin], grams, grid, damp, lin.weight.numel(), row_weights)
                              for lin in linears})
        layer.to(home)
    return stats


def _gram_hook(grams: dict[int, torch.Tensor], key: int) -> Callable[[nn.Module, tuple], None]:
    """A forward pre-hook adding its module's input Gram (float32 parts, float64 sum) to ``grams[key]``."""
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        part = (x.T @ x).double()
        grams[key] = part if key not in grams else grams[key].add_(part)
    return hook


def _statistics(linears: list, grams: dict[int, torch.Tensor], grid: torch.Tensor, damp: float,
                params: int, row_weights: dict[str, torch.Tensor] | None = None) -> LayerStatistics:
    """OWL's outlier ratio and the error curve of the ``linears`` (module docstring): ``"obs"``, or
    ``"fisher"`` given ``row_weights``."""
    scores, errors = [], torch.zeros(len(grid), dtype=torch.float64)
    for lin in linears:
        w = lin.weight.double()
        h, _ = without_dead_inputs(grams[id(lin.module)])
        scores.append((w.abs() * torch.diagonal(h).sqrt()).reshape(-1))
        inverse_diagonal = torch.diagonal(torch.cholesky_inverse(damped_cholesky(h, damp).factor))
        saliency = torch.sort(w**2 / inverse_diagonal, dim=1).values
        cumulative = torch.cat([torch.zeros(w.shape[0], 1, dtype=w.dtype), saliency.cumsum(dim=1)], dim=1)
        zeros = torch.round(grid.double() * w.shape[1]).long().clamp(0, w.shape[1])
        if row_weights is None:
            weight = torch.full((w.shape[0],), 1 / max(float(((w @ h) * w).sum()), 1e-30), dtype=w.dtype)
        else:
            weight = row_weights[lin.name].to(w.dtype)
        errors += weight @ cumulative[:, zeros]
    score = torch.cat(scores)
    outliers = float((score > OUTLIER_MULTIPLE * score.mean()).double().mean())
    return LayerStatistics(params, outliers, grid.double(), errors)


def sparsity_grid(target: float, spread: float) -> torch.Tensor:
    """The sparsities within ``spread`` of ``target`` (and in ``[0, MAX_SPARSITY]``), ``GRID_STEP`` apart."""
    low, high = max(0.0, target - spread), min(MAX_SPARSITY, target + spread)
    count = int(round((high - low) / GRID_STEP)) + 1
    return torch.linspace(low, high, count, dtype=torch.float64)


def allocate(kind: str, target: float, stats: dict[Any, LayerStatistics], spread: float) -> dict[Any, float]:
    """Each unit's sparsity (a layer's or a linear's, by the keys of ``stats``) under allocation ``kind``
    (module docstring) for the average ``target``."""
    if kind not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {kind!r}; choose one of {', '.join(ALLOCATIONS)}")
    layers = sorted(stats)
    params = torch.tensor([stats[i].params for i in layers], dtype=torch.float64)
    if kind == "uniform" or len(layers) == 1:
        chosen = torch.full((len(layers),), target, dtype=torch.float64)
    elif kind == "owl":
        ratio = torch.tensor([stats[i].outlier_ratio for i in layers], dtype=torch.float64)
        span = float(ratio.max() - ratio.min())
        scaled = (ratio - ratio.min()) / span * 2 * spread if span > 0 else torch.zeros_like(ratio)
        chosen = 1 - scaled                 # density up with the outliers; _exact sets the level
    else:
        chosen = _lagrangian([stats[i] for i in layers], params, target)
    # OWL spans 2 spread around its centre wherever the outlier ratios lie; the grid bounds the curves
    low, high = (0.0, MAX_SPARSITY) if kind == "owl" else (max(0.0, target - spread), min(MAX_SPARSITY, target + spread))
    return dict(zip(layers, _exact(chosen, params, target, low, high).tolist()))


def _lagrangian(stats: list[LayerStatistics], params: torch.Tensor, target: float) -> torch.Tensor:
    """Per layer the grid sparsity minimising ``E_l(s) - mu P_l s``, ``mu`` bisected until the
    parameter-weighted average reaches ``target`` (at the grid's resolution)."""
    def pick(mu: float) -> torch.Tensor:
        return torch.stack([s.grid[torch.argmin(s.errors - mu * p * s.grid)] for s, p in zip(stats, params)])

    budget = target * float(params.sum())
    low, high = 0.0, 1.0
    while float((pick(high) * params).sum()) < budget and high < 1e30:
        high *= 10
    for _ in range(100):
        mu = (low + high) / 2
        low, high = (mu, high) if float((pick(mu) * params).sum()) < budget else (low, mu)
    return pick(high)


def _exact(sparsity: torch.Tensor, params: torch.Tensor, target: float, low: float, high: float) -> torch.Tensor:
    """``sparsity`` shifted by a common amount and clipped to ``[low, high]`` until its
    ``params``-weighted average is ``target``."""
    s = sparsity.clone()
    for _ in range(200):
        shift = (target * float(params.sum()) - float((s * params).sum())) / float(params.sum())
        s = (s + shift).clamp(low, high)
        if abs(shift) < 1e-15:
            break
    return s
