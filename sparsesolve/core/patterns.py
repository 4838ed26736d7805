"""Sparsity patterns: validation, exact counts and vectorised projections.

A pattern decides which entries of an ``m x n`` weight (``m`` outputs, ``n`` inputs) may be non-zero.
Every projection keeps the entries with the *largest* scores, so a solver passes ``|W|`` (magnitude),
``|W| * ||X_j||`` (Wanda) or any other saliency and gets back a boolean mask (``True`` = kept).

- ``Unstructured(s, scope="row")``: exactly ``round(s * n)`` zeros in every row.
- ``Unstructured(s, scope="layer")``: exactly ``round(s * m * n)`` zeros in the whole matrix.
- ``NM(n, m)``: exactly ``n`` zeros in every group of ``m`` consecutive inputs of a row
  (2:4 and 4:8 are 50 %, 3:4 is 75 %).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["Pattern", "Patterns", "Unstructured", "NM", "parse_pattern", "pattern_for", "keep_largest"]


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up, robust to float noise (``0.7 * 10 -> 7``)."""
    return int(math.floor(x + 0.5 + 1e-9))


def keep_largest(scores: torch.Tensor, n_zeros: int | torch.Tensor, dim: int = -1, check: bool = True) -> torch.Tensor:
    """Boolean mask keeping all but the ``n_zeros`` smallest entries of ``scores`` along ``dim``.

    ``n_zeros`` is an int (same count for every slice) or an integer tensor broadcastable to the
    other dimensions (one count per slice). Ties are broken by position, deterministically.
    ``check``: refuse NaN or Inf scores (one host synchronisation); a solver's inner loop passes False
    and checks its result once instead.
    """
    if check and not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf: check the weight and calibration statistics")
    rank = torch.argsort(torch.argsort(scores, dim=dim, stable=True), dim=dim)
    if isinstance(n_zeros, torch.Tensor):
        n_zeros = n_zeros.unsqueeze(dim)
    return rank >= n_zeros


class Pattern(ABC):
    """A sparsity pattern for a 2-D weight ``(out_features, in_features)``."""

    @property
    @abstractmethod
    def sparsity(self) -> float:
        """Fraction of zeros the pattern imposes (exact up to rounding of per-row counts)."""

    @abstractmethod
    def validate(self, shape: tuple[int, int]) -> None:
        """Raise ``ValueError`` if the pattern cannot be applied to a weight of this shape."""

    @abstractmethod
    def project(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the same shape keeping the entries with the largest scores."""

    def n_zeros(self, shape: tuple[int, int]) -> int:
        """Exact number of zeros the pattern imposes on a weight of ``shape``."""
        rows, cols = shape
        return rows * round_half_up(self.sparsity * cols)

    def check_mask(self, mask: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``mask`` does not satisfy the pattern exactly."""
        self.validate(tuple(mask.shape))
        zeros = int((~mask).sum())
        expected = self.n_zeros(tuple(mask.shape))
        if zeros != expected:
            raise ValueError(f"mask has {zeros} zeros, pattern {self} needs exactly {expected}")


@dataclass(frozen=True)
class Unstructured(Pattern):
    """``sparsity`` fraction of zeros, counted per output row (``scope="row"``) or per layer."""

    fraction: float
    scope: str = "row"

    def __post_init__(self) -> None:
        if not isinstance(self.fraction, (int, float)) or not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.fraction!r}; e.g. 0.7 for 70 % zeros")
        if self.scope not in ("row", "layer"):
            raise ValueError(f"scope must be 'row' or 'layer', got {self.scope!r}")

    @property
    def sparsity(self) -> float:
        return float(self.fraction)

    def __str__(self) -> str:
        scope = "" if self.scope == "row" else " per layer"
        return f"{100 * self.fraction:g}%{scope}"

    def validate(self, shape: tuple[int, int]) -> None:
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"pattern {self} needs a non-empty 2-D weight, got shape {tuple(shape)}")

    def n_zeros(self, shape: tuple[int, int]) -> int:
        if self.scope == "layer":
            return round_half_up(self.fraction * shape[0] * shape[1])
        return super().n_zeros(shape)

    def zeros_before(self, shape: tuple[int, int], column: int) -> int:
        """Zeros allotted to the first ``column`` inputs (per row, or of the whole layer).

        Cumulative rounding: blocks ``[c0, c1)`` get ``zeros_before(c1) - zeros_before(c0)`` zeros,
        which adds up to the exact total whatever the block sizes.
        """
        rows, _ = shape
        if self.scope == "layer":
            return round_half_up(self.fraction * rows * column)
        return round_half_up(self.fraction * column)

    def project(self, scores: torch.Tensor) -> torch.Tensor:
        self.validate(tuple(scores.shape))
        if self.scope == "layer":
            flat = keep_largest(scores.reshape(-1), self.n_zeros(tuple(scores.shape)))
            return flat.reshape(scores.shape)
        return keep_largest(scores, round_half_up(self.fraction * scores.shape[1]), dim=1)


@dataclass(frozen=True)
class NM(Pattern):
    """``n`` zeros in every group of ``m`` consecutive inputs of each row (N:M semi-structured)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 1 or self.n < 0:
            raise ValueError(f"N:M needs integers 0 <= n < m, got {self.n}:{self.m}")
        if self.n >= self.m:
            raise ValueError(f"N:M needs n < m (n zeros out of m), got {self.n}:{self.m}; e.g. 2:4")

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def validate(self, shape: tuple[int, int]) -> None:
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"pattern {self} needs a non-empty 2-D weight, got shape {tuple(shape)}")
        if shape[1] % self.m:
            raise ValueError(
                f"pattern {self} needs the input width to be a multiple of {self.m}, got {shape[1]}; "
                "use an unstructured pattern for this layer"
            )

    def project(self, scores: torch.Tensor) -> torch.Tensor:
        self.validate(tuple(scores.shape))
        rows, cols = scores.shape
        groups = scores.reshape(rows, cols // self.m, self.m)
        return keep_largest(groups, self.n, dim=2).reshape(rows, cols)

    def check_mask(self, mask: torch.Tensor) -> None:
        super().check_mask(mask)
        zeros = (~mask).reshape(mask.shape[0], -1, self.m).sum(dim=2)
        if not bool((zeros == self.n).all()):
            raise ValueError(f"mask violates {self}: some group of {self.m} does not have {self.n} zeros")


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(spec: Pattern | str | float, scope: str = "row") -> Pattern:
    """Turn ``0.7``, ``"0.7"``, ``"70%"`` or ``"2:4"`` into a ``Pattern``; a ``Pattern`` passes through."""
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"cannot read a sparsity pattern from {spec!r}")
    if isinstance(spec, (int, float)):
        return Unstructured(float(spec), scope)
    if isinstance(spec, str):
        match = _NM_RE.match(spec)
        if match:
            return NM(int(match.group(1)), int(match.group(2)))
        text = spec.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            pass
        else:
            return Unstructured(value, scope)
    raise ValueError(
        f"cannot read a sparsity pattern from {spec!r}: use a fraction (0.7), a percentage (70%) or N:M (2:4)"
    )


#: one pattern for every linear, or one per linear name (a per-linear sparsity allocation)
Patterns = Pattern | Mapping[str, Pattern]


def pattern_for(patterns: Patterns, name: str) -> Pattern:
    """The pattern of the linear called ``name``: ``patterns`` itself, or its entry for ``name``."""
    if isinstance(patterns, Pattern):
        return patterns
    if name not in patterns:
        raise ValueError(f"no pattern for linear {name!r} among the {len(patterns)} per-linear patterns; give one "
                         "for every linear pruned")
    return patterns[name]
