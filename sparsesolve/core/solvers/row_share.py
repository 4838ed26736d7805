"""Weight solves split by rows over the ranks of a token-sharded run.

Row ``i`` of every fixed-mask solve depends only on ``(W*_i, H)``: ``min (w - w*_i) Hd (w - w*_i)^T``
over the row's kept set. So does SparseGPT's row under a per-row pattern (N:M, or unstructured with
``scope="row"``): its mask choices and OBS updates read the row and the shared factor of ``Hd^{-1}``
only. With ``K`` ranks each solves its ``share`` of the ``m`` rows (``m / K`` rows: ``1 / K`` of the
``m n^2`` work; every rank still factors the ``n x n`` Gram, as one process would), then the rows are
all-gathered, the error and reference (sums over rows) summed. Conjugate gradients stop on the
residual of all rows (``distributed.reduce_rows``), so the iterations are those of one process. A
row of a matrix product hardly depends on the other rows computed with it: on SmolLM2 the split rows
are the same bits; on tiny matrices the kernels may round them differently (1e-16 in float64).

Solves whose rows couple (a per-layer pattern, ADMM's shared penalty) run whole on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

from sparsesolve.core import distributed
from sparsesolve.core.patterns import Pattern
from sparsesolve.core.quantize import QuantizationGrid
from sparsesolve.core.solvers.problem import LayerSolution

__all__ = ["row_separable", "solve_rows"]

#: solvers (by name) whose rows decouple under a per-row pattern; the fixed-mask refits always do
ROW_SEPARABLE = frozenset({"sparsegpt"})


def row_separable(solver: str, pattern: Pattern | None) -> bool:
    """True when ``solver``'s rows decouple under ``pattern`` (None: a fixed-mask refit)."""
    if pattern is None:
        return True
    return solver in ROW_SEPARABLE and getattr(pattern, "scope", "row") == "row"


def solve_rows(solve: Callable[[slice], LayerSolution], rows: int, separable: bool) -> LayerSolution:
    """``solve(rows)`` (a solution for the weight rows ``rows``) over all ``rows`` of the weight.

    Token sharded and ``separable``: each rank solves its share and the shares are gathered (module
    docstring); otherwise ``solve(slice(None))`` on every rank.
    """
    if not (distributed.sharded() and separable and rows >= distributed.world_size()):
        return solve(slice(None))
    with distributed.rows_shared():
        part = solve(distributed.share(rows))
    grid = part.grid
    if grid is not None:
        grid = QuantizationGrid(grid.bits, grid.groupsize, distributed.gather_rows(grid.scale, rows),
                                distributed.gather_rows(grid.zero, rows))
    return LayerSolution(
        weight=distributed.gather_rows(part.weight.contiguous(), rows),
        mask=distributed.gather_rows(part.mask.contiguous(), rows),
        error=distributed.reduce_float(part.error),
        reference=distributed.reduce_float(part.reference),
        damping=part.damping,
        escalations=part.escalations,
        iterations=part.iterations,
        seconds=part.seconds,
        info=part.info,
        grid=grid,
    )
