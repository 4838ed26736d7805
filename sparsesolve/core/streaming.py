"""Token-chunked streaming: every per-token computation runs on ``chunk_size`` rows at a time.

Activations are stored once (``N x d``, in the storage dtype); Gram matrices and cross-covariances
are sums over tokens, so accumulating them chunk by chunk in the compute dtype gives the same result
for any chunk size (up to floating-point summation order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

__all__ = ["token_chunks", "accumulate", "map_tokens", "gram", "weigh"]



def token_chunks(n_tokens: int, chunk_size: int | None) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk_size`` tokens (all at once if ``None``)."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    step = n_tokens if chunk_size is None else chunk_size
    for start in range(0, n_tokens, max(step, 1)):
        yield slice(start, min(start + step, n_tokens))


def accumulate(n_tokens: int, chunk_size: int | None, fn: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """``sum_chunks fn(chunk)`` (e.g. ``X_c^T X_c`` for a Gram matrix)."""
    total: torch.Tensor | None = None
    for chunk in token_chunks(n_tokens, chunk_size):
        part = fn(chunk)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no calibration tokens: pass at least one input row")
    return total


def map_tokens(
    n_tokens: int, chunk_size: int | None, fn: Callable[[slice], torch.Tensor], out: torch.Tensor
) -> torch.Tensor:
    """Fill ``out[chunk] = fn(chunk)`` chunk by chunk (cast to ``out``'s dtype) and return ``out``."""
    for chunk in token_chunks(n_tokens, chunk_size):
        out[chunk] = fn(chunk).to(out.dtype)
    return out


def gram(inputs: torch.Tensor, chunk_size: int | None, dtype: torch.dtype,
         weights: torch.Tensor | None = None) -> torch.Tensor:
    """``X^T D^2 X`` (``n x n``) of ``inputs`` (``N x n``), accumulated in ``dtype``; ``D = diag(weights)``
    (token weights, ``N``; None = all ones)."""
    def part(c: slice) -> torch.Tensor:
        x = weigh(inputs[c].to(dtype), weights, c)
        return x.T @ x

    return accumulate(inputs.shape[0], chunk_size, part)


def weigh(rows: torch.Tensor, weights: torch.Tensor | None, chunk: slice) -> torch.Tensor:
    """``rows`` (a chunk of tokens) scaled by their token weights (unchanged when ``weights`` is None):
    a token of weight ``w`` counts like ``w^2`` copies of itself in every sum of squares."""
    return rows if weights is None else rows * weights[chunk].to(rows.dtype).unsqueeze(1)
