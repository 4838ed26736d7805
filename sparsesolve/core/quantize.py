"""Group-wise asymmetric min-max quantisation of weights (for SparseGPT's joint sparsify + quantise).

Each row's inputs are cut into groups of ``groupsize`` consecutive columns; per row and group, with
``lo = min(w, 0)``, ``hi = max(w, 0)`` over the group,

    scale = (hi - lo) / (2^bits - 1),   zero = round(-lo / scale),
    q(w)  = scale * (clamp(round(w / scale) + zero, 0, 2^bits - 1) - zero)

so 0 is represented exactly (a pruned weight stays 0) and ``|w - q(w)| <= scale / 2`` for every ``w``
of the group the parameters were computed on. The scale is rounded to a float32 number, so a weight
computed in float64 and saved in float32 is still exactly ``scale * integer`` (what the compressed
export recovers and stores as codes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GroupQuantizer", "QuantizationGrid"]


@dataclass(frozen=True)
class GroupQuantizer:
    """``bits`` per weight (2 to 8), one (scale, zero) per row and group of ``groupsize`` inputs."""

    bits: int
    groupsize: int = 128

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"wbits must be between 2 and 8, got {self.bits}")
        if self.groupsize < 1:
            raise ValueError(f"groupsize must be >= 1, got {self.groupsize}")

    @property
    def levels(self) -> int:
        """Largest integer code, ``2^bits - 1``."""
        return 2**self.bits - 1

    def params(self, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(scale, zero)`` (shape ``rows x 1``) of a ``rows x g`` block of weights."""
        lo = group.min(dim=1, keepdim=True).values.clamp_max(0)
        hi = group.max(dim=1, keepdim=True).values.clamp_min(0)
        scale = (hi - lo) / self.levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row group
        scale = scale.float().to(scale.dtype)  # float32-representable: q = scale * integer is exact in float32 too
        return scale, torch.round(-lo / scale)

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes in ``[0, 2^bits - 1]`` (as ``w``'s dtype)."""
        return torch.clamp(torch.round(w / scale) + zero, 0, self.levels)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``q(w)`` on the grid of ``(scale, zero)``."""
        return scale * (self.codes(w, scale, zero) - zero)

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """Quantise a whole ``rows x cols`` weight group by group (no error compensation)."""
        out = torch.empty_like(weight)
        for first in range(0, weight.shape[1], self.groupsize):
            group = weight[:, first : first + self.groupsize]
            out[:, first : first + self.groupsize] = self.quantize(group, *self.params(group))
        return out

    def grid(self, params: list[tuple[torch.Tensor, torch.Tensor]]) -> QuantizationGrid:
        """The grid of a whole weight from its per-group ``(scale, zero)`` (each ``rows x 1``, in group order)."""
        scale = torch.cat([s for s, _ in params], dim=1).float()
        zero = torch.cat([z for _, z in params], dim=1).to(torch.int16)
        return QuantizationGrid(self.bits, self.groupsize, scale, zero)


@dataclass(frozen=True)
class QuantizationGrid:
    """What a quantising solve knows about its weight: ``bits``, ``groupsize``, and per row and group the
    ``scale`` (float32, ``rows x groups``) and ``zero`` (int16) of the grid, so a kept weight is
    exactly ``scale * (code - zero)`` with ``code`` in ``[0, 2^bits - 1]``."""

    bits: int
    groupsize: int
    scale: torch.Tensor
    zero: torch.Tensor

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes (``rows x cols`` int16) of a weight on this grid."""
        columns = torch.arange(weight.shape[1], device=weight.device) // self.groupsize
        scale, zero = self.scale[:, columns].to(weight.device), self.zero[:, columns].to(weight.device)
        return torch.clamp(torch.round(weight.float() / scale) + zero, 0, 2**self.bits - 1).to(torch.int16)
