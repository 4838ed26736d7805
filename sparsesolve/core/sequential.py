"""One forward sweep through a chain that solves each layer on the inputs its pruned predecessors give.

``sequential_pass`` is the engine of layer-wise pruning (SparseGPT's setting: each linear
reconstructs its own dense weight from the already-pruned inputs, ``H = a^T a`` of the true pruned
activations) and of every SparseLLM iteration (each linear is solved on the true pruned activations
against the coordinator's target for it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sparsesolve.core.chain import Chain, LinearMap, apply_linear
from sparsesolve.core.patterns import Patterns, pattern_for
from sparsesolve.core.solvers import LayerSolution, get_solver
from sparsesolve.core.solvers.row_share import row_separable, solve_rows
from sparsesolve.core.streaming import gram, map_tokens, squared_error

__all__ = ["ChainSolve", "sequential_pass", "layerwise"]

#: ``solve(stage_index, linear_index, linear, gram, inputs) -> LayerSolution``
StageSolver = Callable[[int, int, LinearMap, torch.Tensor, torch.Tensor], LayerSolution]


@dataclass
class ChainSolve:
    """Weights of every linear (per stage, ``(out, in)``, in the model's dtype: the values it will hold,
    read in the compute dtype where used; a float32 copy of a bfloat16 model's weights would add
    ``4 d f`` bytes per linear and candidate at a peak), their solutions by name, and
    the squared error ``sum_t w_t^2 ||f(x_t) - y_t||^2`` of the chain's output with those weights against
    the target (over every rank's tokens when token sharded). The output itself is never stored: at a
    7B width it would be one more ``N x d_out`` float32 array (2 GiB per 131,072 tokens) per candidate."""

    weights: list[list[torch.Tensor]]
    solutions: dict[str, LayerSolution]
    error: float


def sequential_pass(
    chain: Chain,
    inputs: torch.Tensor,
    solve: StageSolver,
    target: torch.Tensor,
    *,
    dtype: torch.dtype,
    storage_dtype: torch.dtype,
    chunk_size: int | None,
    first_gram: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    last_input: torch.Tensor | Callable[[], torch.Tensor] | None = None,
) -> ChainSolve:
    """Solve stage by stage: Gram of the current (pruned) activations, solve each linear, propagate;
    the last stage's output is compared with ``target`` (``N x d_out``) chunk by chunk.

    ``first_gram``: the Gram of ``inputs`` when the caller has it already (it is not recomputed);
    ``token_weights`` (``N``): each token's weight in every Gram and in the error (``streaming.weigh``);
    ``last_input``: where to write the last stage's input (the pruned activations before the output
    linear, ``N x width``, ``storage_dtype``) instead of a new array, or a function giving it, called
    once the stage before has been solved: the coordinator lends its auxiliary activation, dead at that
    point, and saves one ``N x d_ff`` array at the FFN's peak (the function lets it allocate that array
    only after the solves before it have freed what they no longer need)."""
    n_tokens = inputs.shape[0]
    acts = inputs
    weights: list[list[torch.Tensor]] = []
    solutions: dict[str, LayerSolution] = {}
    for l, stage in enumerate(chain.stages):
        h = first_gram if l == 0 and first_gram is not None else gram(acts, chunk_size, dtype, token_weights)
        stage_solutions = [solve(l, j, lin, h, acts) for j, lin in enumerate(stage.linears)]
        stage_weights = [s.weight for s in stage_solutions]
        solutions.update({lin.name: s for lin, s in zip(stage.linears, stage_solutions)})
        weights.append(stage_weights)
        last = l == len(chain.stages) - 1

        def forward(c: slice, a: torch.Tensor = acts, stage: Any = stage, ws: list = stage_weights) -> torch.Tensor:
            x = a[c].to(dtype)
            pres = [apply_linear(x, w, lin) for lin, w in zip(stage.linears, ws)]
            return pres[0] if stage is chain.stages[-1] else stage.activate(pres)

        if last:
            return ChainSolve(weights, solutions, squared_error(n_tokens, chunk_size, forward, target, token_weights))
        if l == len(chain.stages) - 2 and last_input is not None:
            out = last_input() if callable(last_input) else last_input
        else:
            out = torch.empty(n_tokens, stage_weights[0].shape[0], dtype=storage_dtype, device=inputs.device)
        acts = map_tokens(n_tokens, chunk_size, forward, out)
    raise AssertionError("unreachable: Chain refuses a chain without stages")


def layerwise(
    chain: Chain,
    inputs: torch.Tensor,
    pattern: Patterns,
    solver: str,
    target: torch.Tensor,
    *,
    solver_options: dict[str, Any] | None = None,
    dtype: torch.dtype,
    storage_dtype: torch.dtype,
    chunk_size: int | None = None,
    first_gram: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    last_input: torch.Tensor | Callable[[], torch.Tensor] | None = None,
) -> ChainSolve:
    """Layer-wise pruning: each linear reconstructs its own dense weight on its pruned inputs
    (``pattern``: one for all, or one per linear name; ``target``, ``first_gram``, ``token_weights``,
    ``last_input``: see ``sequential_pass``)."""
    method = get_solver(solver)
    options = dict(solver_options or {})

    def solve(l: int, j: int, linear: LinearMap, h: torch.Tensor, acts: torch.Tensor) -> LayerSolution:
        own = pattern_for(pattern, linear.name)
        return solve_rows(lambda rows: method(linear.weight[rows], h, own, compute_dtype=dtype, **options),
                          linear.weight.shape[0], row_separable(solver, own))

    return sequential_pass(chain, inputs, solve, target, dtype=dtype, storage_dtype=storage_dtype, chunk_size=chunk_size,
                           first_gram=first_gram, token_weights=token_weights, last_input=last_input)
