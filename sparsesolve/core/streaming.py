"""Token-chunked streaming: every per-token computation runs on ``chunk_size`` rows at a time.

Activations are stored once (``N x d``, in the storage dtype); Gram matrices and cross-covariances
are sums over tokens, so accumulating them chunk by chunk in the compute dtype gives the same result
for any chunk size (up to floating-point summation order). Under token sharding
(``distributed.token_sharded``) each rank holds a share of the tokens and ``accumulate`` all-reduces
its sum, so a Gram or cross-covariance is that of all ranks' tokens; per-token maps stay local.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from sparsesolve.core.distributed import reduce, sharded

__all__ = ["token_chunks", "accumulate", "accumulate_products", "map_tokens", "gram", "squared_error", "squared_norm", "weigh"]



def token_chunks(n_tokens: int, chunk_size: int | None) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk_size`` tokens (all at once if ``None``)."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    step = n_tokens if chunk_size is None else chunk_size
    for start in range(0, n_tokens, max(step, 1)):
        yield slice(start, min(start + step, n_tokens))


def accumulate(n_tokens: int, chunk_size: int | None, fn: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """``sum_chunks fn(chunk)`` (e.g. ``X_c^T X_c`` for a Gram matrix), summed over the ranks when token
    sharded; a rank without tokens contributes ``fn`` of the empty slice (zeros of the right shape).

    Each chunk's part is computed in its own dtype; the parts are summed, and all-reduced, in float64
    and the total is returned in the parts' dtype. So the result depends on the chunks, not on the
    order they are added in: one process and K ranks holding the same chunks get the same total
    (to float64 roundoff, far below a float32 ulp), however the tokens are split."""
    total: torch.Tensor | None = None
    dtype = None
    for chunk in token_chunks(n_tokens, chunk_size):
        part = fn(chunk)
        dtype = part.dtype
        total = part.to(torch.float64) if total is None else total.add_(part)
    if total is None:
        part = fn(slice(0, 0))
        total, dtype = part.to(torch.float64), part.dtype
    return reduce(total).to(dtype)


def accumulate_products(n_tokens: int, step: int | None, chunk_size: int | None,
                        fn: Callable[[slice], tuple[list[torch.Tensor], torch.Tensor]]) -> list[torch.Tensor]:
    """``[sum_c A_{j,c}^T B_c for each j]`` for ``([A_{1,c}, A_{2,c}, ...], B_c) = fn(c)`` (``c x M_j`` and
    ``c x K``) over chunks of ``step`` tokens: added in place in the parts' dtype over runs of at least
    ``chunk_size`` tokens (None: all of them), as one product over ``chunk_size`` tokens would sum them,
    and those runs in float64; summed over the ranks when token sharded. For a stream whose per-token
    work wants smaller chunks than its sums: no ``M_j x K`` product per chunk is materialised, a single
    run needs no float64 copy, and each sum is its own array (a caller may drop each once used)."""
    totals: list[torch.Tensor | None] = []
    partials: list[torch.Tensor] = []
    since = 0
    for chunk in list(token_chunks(n_tokens, step)) or [slice(0, 0)]:
        parts, b = fn(chunk)
        if not partials:
            partials = [torch.zeros(a.shape[1], b.shape[1], dtype=a.dtype, device=a.device) for a in parts]
            totals = [None] * len(parts)
        for partial, a in zip(partials, parts):
            partial.addmm_(a.T, b)
        since += chunk.stop - chunk.start
        if chunk_size is not None and since >= chunk_size:
            totals = [p.to(torch.float64, copy=True) if t is None else t.add_(p) for t, p in zip(totals, partials)]
            for partial in partials:
                partial.zero_()
            since = 0
    if not sharded() and all(t is None for t in totals):
        return partials             # one run: its sums are the totals, and no float64 copy is needed
    for j, (total, partial) in enumerate(zip(totals, partials)):
        summed = partial.to(torch.float64, copy=True) if total is None else total.add_(partial)
        partial.copy_(reduce(summed))
        totals[j] = summed = None
    return partials


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


def squared_error(n_tokens: int, chunk_size: int | None, output: Callable[[slice], torch.Tensor], target: torch.Tensor,
                  weights: torch.Tensor | None = None) -> float:
    """``sum_t w_t^2 ||output_t - target_t||^2`` with ``output(chunk)`` computed chunk by chunk and never
    stored, summed in float64 and over the ranks when token sharded (``target``: ``N x d``)."""
    def part(c: slice) -> torch.Tensor:
        out = output(c)
        return (weigh(out - target[c].to(out.dtype), weights, c).to(torch.float64) ** 2).sum()

    return float(accumulate(n_tokens, chunk_size, part))


def squared_norm(values: torch.Tensor, chunk_size: int | None, weights: torch.Tensor | None = None) -> float:
    """``sum_t w_t^2 ||v_t||^2`` of ``values`` (``N x d``), summed in float64 one chunk of
    ``chunk_size`` tokens at a time (so with a chunk size no ``N x d`` temporary; None: one chunk),
    over every rank's tokens when token sharded."""
    return float(accumulate(values.shape[0], chunk_size,
                            lambda c: (weigh(values[c], weights, c).to(torch.float64) ** 2).sum()))


def weigh(rows: torch.Tensor, weights: torch.Tensor | None, chunk: slice) -> torch.Tensor:
    """``rows`` (a chunk of tokens) scaled by their token weights (unchanged when ``weights`` is None):
    a token of weight ``w`` counts like ``w^2`` copies of itself in every sum of squares."""
    return rows if weights is None else rows * weights[chunk].to(rows.dtype).unsqueeze(1)
