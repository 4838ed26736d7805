"""A linear layer trained sparse: dense master weight, boolean mask, straight-through gradient.

Forward with ``W * M``; backward passes the gradient of the masked weight to the dense ``W``
unchanged (straight-through estimator), so pruned weights keep learning and can come back when the
mask is refreshed from the current magnitudes. Wraps ``nn.Linear`` and GPT-2's ``Conv1D`` (weight
stored ``in x out``); the mask is kept ``out x in`` like every pattern in sparsesolve.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from sparsesolve.core.patterns import NM, Pattern
from sparsesolve.lm.slorb import SLoRB

__all__ = ["TWO_FOUR", "SparseLinear", "sparse_linears", "wrap_linears"]

TWO_FOUR = NM(2, 4)  # AST's pattern: 2 zeros in every 4 consecutive inputs


class SparseLinear(nn.Module):
    """``y = x (W * M)^T + b`` with a straight-through gradient to ``W`` (``module`` keeps ``W`` and ``b``)."""

    def __init__(self, module: nn.Module, mask: torch.Tensor | None = None, pattern: Pattern = TWO_FOUR,
                 slorb_k: int | None = None, slorb_trainable_projection: bool = False,
                 slorb_dense: torch.Tensor | None = None) -> None:
        """``slorb_dense``: the dense weights (``out x in``) whose pruned entries initialise SLoRB (the
        teacher's: a one-shot student's pruned entries are already zero); default the module's own."""
        super().__init__()
        self.module = module
        self.transposed = not isinstance(module, nn.Linear)  # Conv1D: weight is in x out
        self.pattern = pattern
        weight = self.weight_out_in()
        pattern.validate(tuple(weight.shape))
        mask = pattern.project(weight.detach().abs()) if mask is None else mask.to(torch.bool)
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the weight {tuple(weight.shape)} (out x in)")
        self.register_buffer("mask", mask.to(weight.device))
        source = weight if slorb_dense is None else slorb_dense.to(weight.device)
        self.slorb = SLoRB(source, self.mask, slorb_k, slorb_trainable_projection) if slorb_k else None

    def weight_out_in(self) -> torch.Tensor:
        """The dense master weight as ``out x in`` (a view: gradients reach the module's parameter)."""
        w = self.module.weight
        return w.T if self.transposed else w

    def masked_weight(self) -> torch.Tensor:
        """``W * M`` in the forward pass; its gradient flows to ``W`` unmasked (straight-through)."""
        w = self.weight_out_in()
        return w - (w * ~self.mask).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (W * M)^T + b`` (+ SLoRB's ``(P x) S^T``)."""
        y = nn.functional.linear(x, self.masked_weight().to(x.dtype), self.module.bias)
        return y if self.slorb is None else y + self.slorb(x)

    @torch.no_grad()
    def refresh_mask(self) -> int:
        """Re-select the mask from the current dense magnitudes; the number of entries that changed."""
        new = self.pattern.project(self.weight_out_in().detach().float().abs())
        flips = int((new != self.mask).sum())
        self.mask.copy_(new)
        return flips

    @torch.no_grad()
    def project_(self) -> None:
        """Hard projection: zero the pruned entries of the master weight (exact pattern afterwards)."""
        self.weight_out_in().mul_(self.mask)


def wrap_linears(model: nn.Module, names: list[str], masks: dict[str, torch.Tensor] | None = None,
                 pattern: Pattern = TWO_FOUR, slorb_k: int | None = None,
                 slorb_trainable_projection: bool = False,
                 slorb_dense: dict[str, torch.Tensor] | None = None) -> dict[str, SparseLinear]:
    """Replace the named linear modules of ``model`` by ``SparseLinear`` wrappers (masks from ``masks``,
    else magnitude; SLoRB initialised from ``slorb_dense[name]`` where given); returns them by name."""
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, SparseLinear):
            raise ValueError(f"{name} is already a SparseLinear")
        layer = SparseLinear(module, None if masks is None else masks[name], pattern, slorb_k, slorb_trainable_projection,
                             None if slorb_dense is None else slorb_dense[name])
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def sparse_linears(model: nn.Module) -> Iterator[tuple[str, SparseLinear]]:
    """Every ``SparseLinear`` of ``model`` with its name."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            yield name, module
