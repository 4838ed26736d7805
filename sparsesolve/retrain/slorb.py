"""SLoRB: extra low-rank parameters that give a pruned linear back some of its removed weight.

``y += S (P x)`` where ``P`` (``n/k x n``) sums each block of ``k`` consecutive inputs (row ``j`` of
``P`` is 1 on inputs ``jk .. jk + k - 1``) and ``S`` (``m x n/k``) is initialised to the mean of the
pruned weights of row ``i`` in block ``j``:

    S_ij = (1/k) sum_{t in block j} W_it (1 - M_it)

which is exact when the inputs are constant within each block (``sum_t W_it (1 - M_it) x_t`` with
``x_t = xbar_j``). The overhead is ``m n / k`` parameters (``+ n^2 / k`` with a trainable ``P``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SLoRB"]


class SLoRB(nn.Module):
    """``x -> (P x) S^T`` for a linear with ``out_features x in_features`` weight; ``k`` divides ``in``."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, k: int = 16, trainable_projection: bool = False) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if k < 1 or in_features % k:
            raise ValueError(f"SLoRB block size k={k} must divide the input width {in_features}; choose e.g. k=16")
        self.k = k
        pruned = (weight.detach() * ~mask).float()
        self.scale = nn.Parameter(pruned.reshape(out_features, in_features // k, k).mean(dim=2))
        if trainable_projection:
            blocks = torch.arange(in_features) // k
            self.projection: nn.Parameter | None = nn.Parameter(
                (blocks.unsqueeze(0) == torch.arange(in_features // k).unsqueeze(1)).float())
        else:
            self.projection = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(P x) S^T`` for ``x`` of shape ``(..., in_features)``."""
        if self.projection is None:
            summed = x.reshape(*x.shape[:-1], -1, self.k).sum(dim=-1)
        else:
            summed = x @ self.projection.to(x.dtype).T
        return summed @ self.scale.to(x.dtype).T

    def parameter_count(self) -> int:
        """Extra parameters (``S``, and ``P`` when trainable)."""
        return sum(p.numel() for p in self.parameters())
