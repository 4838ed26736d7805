"""SparseLLM: global pruning of a chain by coordinated subproblems.

For a chain of stages ``l = 0..L-1`` (``a_{-1} = X``; see ``chain.py``) with pre-activations ``z_l``
and activations ``a_l`` as free auxiliary variables for ``l < L-1``, the penalised objective is::

    F = beta ||a_{L-2} W_{L-1}^T + b - Y||^2
        + sum_{l < L-1} [ alpha sum_j ||z_{l,j} - (a_{l-1} W_{l,j}^T + b_{l,j})||^2 + gamma ||a_l - psi_l(z_l)||^2 ]

with ``Y`` the dense chain's output and every ``W`` constrained to the pattern. The weights start
from the one-shot solution (iteration 0: layer-wise pruning with the same solver, e.g. SparseGPT) and
the auxiliaries from the dense forward pass. One iteration:

1. for ``l = L-2 .. 0`` (backward), given the current weights: ``a_l`` <- ridge solve
   ``(w sum_j W_{l+1,j}^T W_{l+1,j} + gamma I) a = w sum_j W_{l+1,j}^T (t_j - b_j) + gamma psi_l(z_l)``
   (``w = beta`` next to the output, ``alpha`` elsewhere; one Cholesky factor for all tokens), then
   ``z_l`` <- elementwise proximal update given ``a_l`` (``stage.prox``). Each is an exact minimiser
   (or, for the local proximal step, a descent step) of ``F``, so ``F`` never increases across them.
2. one sequential pass: stage by stage, every ``W_{l,j}`` <- masked solve with the true pruned
   activations of the stages before it as input and the coordinator's ``z_{l,j}`` (``Y`` for the last
   stage) as target, then a refit on the chosen mask (``refine``: conjugate gradients, matmul-shaped,
   or the exact per-row solve). The weights are consistent with their real inputs by construction, so
   the iterate is a candidate as it stands; the candidate with the lowest true error
   ``||f(X) - Y||^2`` wins, the one-shot start included, so the result is never worse than the
   one-shot solution on the calibration data.

Step 2 replaces the two steps of the paper's formulation (a masked solve on the auxiliary inputs, then
a consistency refit on the true ones) by one: the solve on auxiliary inputs only steered the next
auxiliary update, and steering it with the consistent weights instead costs one solve per linear and
iteration instead of two (the P1 runs and the scale benchmark in README.md measure what it costs and
gains). ``F`` is not monotone across step 2 (the weights fit the true inputs,
not the auxiliaries); keep-best guards the result. The passes write their pruned activations before
the output linear into the storage of ``a_{L-2}`` (``CoordinatorState.lendable``), which step 1
rewrites before reading it: one ``N x d_ff`` array less at an FFN's peak, the same iterates (the
objective recorded before step 1 is then taken at those activations).

The pre-activations ``z_l`` (two ``N x d_ff`` arrays for a gated FFN) are read only from step 1 on,
and in the last iteration not after the pass has solved their stage. So they are released there, and
off the CPU (``recompute_preactivations``) they are not stored by the dense forward either: they are
computed again from the dense weights after the one-shot start, the same values, for one more
forward of the stages before the output linear (``2 N d d_ff`` multiply-adds for a gated FFN: by
count about 0.4 s of an H100 at 7B width and 131,072 tokens). Neither the start nor the end of the
last pass then holds them (earlier passes keep them for the next iteration). On the CPU, where that
forward is about 9 % of the FFN's per-token work (README), they stay stored by default
(``config.preactivations`` chooses either way on any device).

In the last iteration of a two-stage chain (an FFN; without the objective trace) nothing reads the
auxiliaries after step 1 but the pass's cross-covariances of gate and up with ``X``, which is that
stage's input in every pass. So step 1 runs there as one sweep over the tokens
(``CoordinatorState.fused_updates``): per chunk the dense pre-activations (stored, or computed from
the dense weights), the activation update, the pre-activation update and those cross-covariances;
no auxiliary is stored, each value is rounded to the storage dtype where the stored updates would
store it, and the iterates are the same (to rounding where the sweep's chunks differ from
``chunk_size``'s: the sums over tokens then run over other chunks). With the default single
iteration the coordinator then holds no ``N x d_ff`` array beyond the one a layer-wise method holds
(the pruned activation before the output linear) but the dense pre-activations, and those only when
they are kept.

Only the ratios ``beta / gamma`` and ``alpha / gamma`` matter: scaling all three by a common factor
leaves every update unchanged.

Three options guard against over-fitting the calibration tokens:

- held-out selection (``heldout=``, tokens kept out of every fit): the candidates are ranked by
  ``||f(X_h) - Y_h||^2`` on the held-out tokens instead of the fitted ones (both are recorded);
- a trust region (``config.trust = rho``): each coordinated solve minimises
  ``||W X - T||^2 + rho ||(W - W0) X||^2`` with ``W0`` the one-shot weight, which is the plain masked
  problem for the target cross-covariance ``(C + rho W0 H) / (1 + rho)`` (``H = X^T X``): the fit is
  pulled toward the one-shot solution in the metric of its inputs;
- a ridge centred on the one-shot weights (``config.ridge = r``): a coordinated solve's damping
  ``lam ||W||^2`` (``lam = damp mean(diag H)``) pulls the directions its calibration inputs barely
  span toward zero, where the one-shot solves (no target) keep the dense weights; with ``r`` it pays
  ``(damp + r) mean(diag H) ||W - W0||^2`` instead, which only adds ``lam W0`` to the cross-covariance
  (``LayerProblem.build(anchor=W0)``): those directions keep the one-shot weights. With
  ``config.ridge_below`` it applies only when the linear's pattern's sparsity is below that.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from sparsesolve.core.chain import Chain, LinearMap, apply_linear
from sparsesolve.core.config import PREACTIVATIONS, UPDATE_BLOCK, UPDATE_BLOCK_DEVICE, PruneConfig, SparseLLMConfig
from sparsesolve.core.distributed import reduce_count
from sparsesolve.core.linalg import compute_dtype_for, damped_cholesky, plus_diagonal
from sparsesolve.core.patterns import Pattern, Patterns, pattern_for
from sparsesolve.core.sequential import layerwise, sequential_pass
from sparsesolve.core.solvers import LayerProblem, LayerSolution, cg_refit, get_solver, refit
from sparsesolve.core.solvers.row_share import row_separable, solve_rows
from sparsesolve.core.streaming import accumulate, accumulate_products, gram, map_tokens, squared_error, squared_norm, token_chunks, weigh

__all__ = ["ChainResult", "CoordinatorState", "HeldOut", "sparsellm", "prune_chain", "trust_region_cross"]

#: conjugate-gradient iterations of a refit at most, when chosen by cost: 4 give 95 % of a converged
#: refit's gain on SmolLM2 layer 1 (benchmarks/README.md)
REFINE_ITER_MAX = 4


def recompute_preactivations(device: torch.device | str, preactivations: str = "auto") -> bool:
    """Whether the coordinator computes the dense pre-activations after the one-shot start instead of
    keeping them from the dense forward (module docstring), for ``SparseLLMConfig.preactivations``:
    ``"recompute"``, ``"keep"``, or ``"auto"``: off the CPU, where memory is what is short and the extra
    forward is cheap (``lm.memory`` reads the same rule)."""
    if preactivations not in PREACTIVATIONS:
        raise ValueError(f"preactivations must be one of {', '.join(PREACTIVATIONS)}, got {preactivations!r}")
    return preactivations == "recompute" or (preactivations == "auto" and torch.device(device).type != "cpu")


@dataclass
class ChainResult:
    """Result of pruning a chain.

    - ``solutions``: per linear name, the ``LayerSolution`` that produced its final weight.
    - ``error``: ``||f(X) - Y||^2`` of the returned weights on the calibration inputs (``Y`` dense output);
      ``reference = ||Y||^2``; ``start_error``: the one-shot (layer-wise) start's error.
    - ``history``: one dict per coordinator iteration (``objective_trace``: the penalised objective after
      each block update; ``error``: true error of the iteration's consistent candidate).
    - ``best_iteration``: 0 for the one-shot start; ``seconds``: wall time.
    - ``heldout_error``, ``heldout_reference``, ``start_heldout_error``: the same on held-out tokens
      (None without them); the candidates were then chosen by ``heldout_error``.
    """

    solutions: dict[str, LayerSolution]
    error: float
    reference: float
    start_error: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_iteration: int = 0
    seconds: float = 0.0
    heldout_error: float | None = None
    heldout_reference: float | None = None
    start_heldout_error: float | None = None

    @property
    def relative_error(self) -> float:
        """``||f(X) - Y||^2 / ||Y||^2``."""
        return self.error / self.reference if self.reference > 0 else 0.0

    @property
    def heldout_relative_error(self) -> float | None:
        """``||f(X_h) - Y_h||^2 / ||Y_h||^2`` on the held-out tokens (None without them)."""
        if self.heldout_error is None or self.heldout_reference is None:
            return None
        return self.heldout_error / self.heldout_reference if self.heldout_reference > 0 else 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned linears."""
        zeros = sum(int((~s.mask).sum()) for s in self.solutions.values())
        return zeros / max(1, sum(s.mask.numel() for s in self.solutions.values()))


def _token_count(inputs: torch.Tensor) -> int:
    """The number of calibration tokens (over all ranks when token sharded); one-line error when none."""
    count = reduce_count(inputs.shape[0])
    if count == 0:
        raise ValueError("no calibration tokens: pass at least one input row")
    return count


def trust_region_cross(cross: torch.Tensor, start: torch.Tensor, gram: torch.Tensor, trust: float) -> torch.Tensor:
    """The cross-covariance ``(C + rho W0 H) / (1 + rho)`` (``m x n``) whose masked least-squares problem
    is ``min ||W X - T||^2 + rho ||(W - W0) X||^2`` (up to a constant and the factor ``1 + rho``), for
    ``C = T^T X`` (``cross``), ``W0`` (``start``, ``m x n``), ``H = X^T X`` (``gram``), ``rho = trust``."""
    return (cross + trust * start @ gram) / (1 + trust)


class HeldOut:
    """Tokens kept out of every fit (``N_h x n``): the dense chain's output on them, computed when built
    (before any weight changes), and the squared error of candidate weights against it."""

    def __init__(self, chain: Chain, tokens: torch.Tensor, chunk_size: int | None, dtype: torch.dtype) -> None:
        self.chain, self.tokens, self.chunk, self.dtype = chain, tokens, chunk_size, dtype
        n, width = tokens.shape[0], chain.stages[-1].linear.weight.shape[0]
        self.target = map_tokens(n, chunk_size, lambda c: chain.forward(tokens[c].to(dtype)),
                                 torch.empty(n, width, dtype=dtype, device=tokens.device))
        self.reference = squared_norm(self.target, chunk_size)

    def error(self, weights: list[list[torch.Tensor]]) -> float:
        """``||f_W(X_h) - Y_h||^2`` (over every rank's held-out tokens when token sharded), chunk by chunk:
        the candidate's output is never stored."""
        return squared_error(self.tokens.shape[0], self.chunk,
                             lambda c: self.chain.forward(self.tokens[c].to(self.dtype), weights), self.target)


def _held_out(chain: Chain, tokens: torch.Tensor | None, chunk_size: int | None, dtype: torch.dtype) -> HeldOut | None:
    """``HeldOut`` for ``tokens``, or None when there are none (on any rank)."""
    if tokens is None or reduce_count(tokens.shape[0]) == 0:
        return None
    return HeldOut(chain, tokens, chunk_size, dtype)


class CoordinatorState:
    """The state of one SparseLLM run: inputs, dense output, auxiliaries and current weights."""

    def __init__(self, chain: Chain, inputs: torch.Tensor, dtype: torch.dtype, storage: torch.dtype,
                 chunk_size: int | None, alpha: float, beta: float, gamma: float,
                 token_weights: torch.Tensor | None = None, keep_preactivations: bool = True) -> None:
        self.chain, self.inputs, self.dtype, self.storage, self.chunk = chain, inputs, dtype, storage, chunk_size
        self.weights = token_weights
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.n = inputs.shape[0]
        self.last = len(chain.stages) - 1
        self.pres: list[list[torch.Tensor | None]] = [[None] * len(stage.linears) for stage in chain.stages[:-1]]
        if keep_preactivations:
            self._allocate_preactivations()
        self.acts: list[torch.Tensor | None] = [self._empty(stage.linears[0].weight.shape[0]) for stage in chain.stages[:-1]]
        dense = self._dense_weights()
        # in the update chunks, as ``fused_updates`` computes the pre-activations: kept or computed again,
        # they are the same values
        self.sweep_chunk = self.update_chunk(max((lin.weight.shape[0] for stage in chain.stages[:-1]
                                                  for lin in stage.linears), default=1))
        self.target = map_tokens(self.n, self.sweep_chunk, lambda c: self._dense_forward(c, dense, keep_preactivations, True),
                                 torch.empty(self.n, dense[-1][0].shape[0], dtype=dtype, device=inputs.device))
        self.input_gram = gram(inputs, chunk_size, dtype, token_weights)

    def _allocate_preactivations(self) -> None:
        self.pres = [[self._empty(lin.weight.shape[0]) for lin in stage.linears] for stage in self.chain.stages[:-1]]

    def _dense_weights(self, stages: int | None = None) -> list[list[torch.Tensor]]:
        """The weights of the chain's first ``stages`` stages (None: all) in the compute dtype (its modules
        hold the dense weights until the end)."""
        return [[lin.weight.to(self.dtype) for lin in stage.linears] for stage in self.chain.stages[:stages]]

    def _dense_forward(self, c: slice, dense: list[list[torch.Tensor]], store_pres: bool,
                       store_acts: bool) -> torch.Tensor | None:
        """The dense chain (``dense`` weights) on tokens ``c`` in the compute dtype, storing the
        pre-activations and/or the activations (only the stored copies are rounded to the storage
        dtype); the output when the activations are stored (the first pass), else None (the output
        linear is skipped)."""
        a = self.inputs[c].to(self.dtype)
        for l, stage in enumerate(self.chain.stages[:-1]):
            pres = [apply_linear(a, w, lin) for lin, w in zip(stage.linears, dense[l])]
            if store_pres:
                for store, p in zip(self.pres[l], pres):
                    store[c] = p.to(self.storage)
            a = stage.activate(pres)
            if store_acts:
                self.acts[l][c] = a.to(self.storage)
        return apply_linear(a, dense[-1][0], self.chain.stages[-1].linear) if store_acts else None

    def restore_preactivations(self) -> None:
        """Compute the dense pre-activations if they were not kept (one forward of the stages before the
        output linear)."""
        if all(p is not None for ps in self.pres for p in ps):
            return
        self._allocate_preactivations()
        dense = self._dense_weights(self.last)      # the output linear is not applied
        for c in token_chunks(self.n, self.sweep_chunk):
            self._dense_forward(c, dense, True, False)

    def release_preactivation(self, l: int, j: int) -> None:
        """Drop ``z_{l,j}`` once nothing reads it again (the last pass has taken its cross-covariance)."""
        self.pres[l][j] = None

    def release_auxiliaries(self) -> None:
        """Drop every stored auxiliary (after ``fused_updates``, nothing reads them again)."""
        self.pres = [[None] * len(ps) for ps in self.pres]
        self.acts = [None] * len(self.acts)

    def update_chunk(self, width: int) -> int:
        """Tokens per chunk of the elementwise updates of a stage ``width`` wide: ``chunk_size`` capped so
        that a chunk holds at most ``UPDATE_BLOCK`` values (``UPDATE_BLOCK_DEVICE`` off the CPU)."""
        block = UPDATE_BLOCK if self.inputs.device.type == "cpu" else UPDATE_BLOCK_DEVICE
        rows = max(1, block // max(width, 1))
        return rows if self.chunk is None else min(self.chunk, rows)

    def _empty(self, width: int) -> torch.Tensor:
        """An uninitialised auxiliary, ``N x width`` in the storage dtype."""
        return torch.empty(self.n, width, dtype=self.storage, device=self.inputs.device)

    @property
    def lendable(self) -> Callable[[], torch.Tensor] | None:
        """What gives the storage of the auxiliary activation ``a_{L-2}`` (None for a single stage), which
        the sequential passes may overwrite with their pruned activations: ``a_{L-2}`` is read only after
        its own update rewrites it (``update_activation`` reads ``z_{L-2}``, not ``a_{L-2}``), while an
        earlier ``a_l`` is read by the pre-activation update of stage ``l + 1`` before its own update.
        Released (``release_lendable``), it is allocated again when a pass asks for it."""
        return self._lend if self.acts else None

    def _lend(self) -> torch.Tensor:
        if self.acts[-1] is None:
            self.acts[-1] = self._empty(self.chain.stages[-1].linear.weight.shape[1])
        return self.acts[-1]

    def release_lendable(self) -> None:
        """Drop ``a_{L-2}`` before the last pass: nothing reads it again, and the pass allocates its own
        activation only once its pre-activations are released (one ``N x d_ff`` array less while the
        stage before the output linear is solved)."""
        if self.acts:
            self.acts[-1] = None

    def stage_input(self, l: int) -> torch.Tensor:
        return self.inputs if l == 0 else self.acts[l - 1]

    def stage_targets(self, l: int) -> list[torch.Tensor]:
        return [self.target] if l == self.last else self.pres[l]

    def cross(self, target: torch.Tensor, linear: LinearMap, acts: torch.Tensor) -> torch.Tensor:
        """``(T - b)^T a``: the cross-covariance of a linear's target with its input, streamed."""
        def part(c: slice) -> torch.Tensor:
            t = target[c].to(self.dtype)
            if linear.bias is not None:
                t = t - linear.bias.to(self.dtype)
            return weigh(t, self.weights, c).T @ weigh(acts[c].to(self.dtype), self.weights, c)

        return accumulate(self.n, self.chunk, part)

    def objective(self, weights: list[list[torch.Tensor]]) -> float:
        """The penalised objective ``F`` (module docstring) at the current auxiliaries and ``weights``."""
        def part(c: slice) -> torch.Tensor:
            total = torch.zeros((), dtype=self.dtype, device=self.inputs.device)
            for l, stage in enumerate(self.chain.stages):
                x = self.stage_input(l)[c].to(self.dtype)
                targets = [t[c].to(self.dtype) for t in self.stage_targets(l)]
                fit = sum((weigh(apply_linear(x, w, lin) - t, self.weights, c) ** 2).sum()
                          for lin, w, t in zip(stage.linears, weights[l], targets))
                total = total + (self.beta if l == self.last else self.alpha) * fit
                if l < self.last:
                    gap = weigh(self.acts[l][c].to(self.dtype) - stage.activate(targets), self.weights, c)
                    total = total + self.gamma * (gap**2).sum()
            return total

        return float(accumulate(self.n, self.chunk, part))

    def update_activation(self, l: int, weights: list[list[torch.Tensor]]) -> int:
        """Ridge update of ``a_l`` against the next stage's targets and ``psi_l(z_l)`` (``activation_step``),
        stored; returns escalations."""
        step, escalations = self.activation_step(l, weights)
        stage = self.chain.stages[l]
        map_tokens(self.n, self.update_chunk(self.acts[l].shape[1]),
                   lambda c: step(stage.activate([p[c].to(self.dtype) for p in self.pres[l]]), c), self.acts[l])
        return escalations

    def activation_step(self, l: int, weights: list[list[torch.Tensor]]) -> tuple[Callable[[torch.Tensor, slice], torch.Tensor], int]:
        """``(step, escalations)``: ``step(psi, c)`` is the ridge update of ``a_l`` on tokens ``c`` given
        ``psi = psi_l(z_l[c])`` (compute dtype).

        With the next stage's weights stacked as ``W`` (``O x n``) and its targets minus biases as ``T``
        (``N x O``), the minimiser of ``w ||T - a W^T||^2 + gamma ||a - psi||^2`` is the residual
        correction ``a = psi + (T - psi W^T) B`` with ``B = (W W^T + r I)^{-1} W = W (W^T W + r I)^{-1}``,
        ``r = gamma / w`` (push-through identity). ``B`` is factored once from the smaller of the two
        Grams; each token then costs two products of ``O x n`` instead of an ``n x n`` triangular solve.
        """
        nxt = self.chain.stages[l + 1]
        ridge = self.gamma / (self.beta if l + 1 == self.last else self.alpha)
        stacked = torch.cat(weights[l + 1]).to(self.dtype)
        outer = stacked.shape[0] <= stacked.shape[1]
        small = stacked @ stacked.T if outer else stacked.T @ stacked
        chol = damped_cholesky(plus_diagonal(small, torch.tensor(ridge, dtype=self.dtype, device=small.device)), 0.0)
        coupling = chol.solve(stacked) if outer else chol.solve(stacked.T).T
        biases = [lin.bias for lin in nxt.linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(w.shape[0], dtype=self.dtype, device=w.device) if b is None else b.to(self.dtype)
             for b, w in zip(biases, weights[l + 1])])
        targets = self.stage_targets(l + 1)

        def step(psi: torch.Tensor, c: slice) -> torch.Tensor:
            residual = torch.cat([t[c].to(self.dtype) for t in targets], dim=1) - psi @ stacked.T
            if bias is not None:
                residual = residual - bias
            return psi + residual @ coupling

        return step, chol.escalations

    def fused_updates(self, weights: list[list[torch.Tensor]], local_steps: int | None = None) -> tuple[list[torch.Tensor], int]:
        """The last iteration's auxiliary updates of a two-stage chain (an FFN) in one sweep over the
        tokens that stores nothing: per chunk the activation update (``activation_step``), the
        pre-activation update, and the cross-covariances ``(z_j - b_j)^T X`` of the new pre-activations
        with the chain's inputs, which is all the last pass reads of the auxiliaries (the first stage's
        input is ``X`` in every pass). Each value is rounded to the storage dtype where the stored updates
        store it, so the results are theirs (bit for bit in the tests, whose token chunks coincide; each
        cross-covariance is its own product, as in ``cross``). Where the chunks differ, the
        cross-covariances are summed in update chunks (``streaming.accumulate_products``: in place over
        runs of about ``chunk_size`` tokens, then in float64), which changes only the rounding. The
        dense pre-activations are read where stored, else computed from the dense weights; stored or
        not, they are computed over the update chunks (``sweep_chunk``), so either way they are the same
        values. Returns the cross-covariances (``m_j x n`` per linear of the first stage) and the ridge
        escalations."""
        stage = self.chain.stages[0]
        step, escalations = self.activation_step(0, weights)
        dense = self._dense_weights(1)[0] if any(p is None for p in self.pres[0]) else None

        def stored(values: torch.Tensor) -> torch.Tensor:
            return values.to(self.storage).to(self.dtype)

        def part(c: slice) -> tuple[list[torch.Tensor], torch.Tensor]:
            x = self.inputs[c].to(self.dtype)
            z = ([p[c].to(self.dtype) for p in self.pres[0]] if dense is None
                 else [stored(apply_linear(x, w, lin)) for lin, w in zip(stage.linears, dense)])
            a = stored(step(stage.activate(z), c))
            maps = [apply_linear(x, w, lin) for lin, w in zip(stage.linears, weights[0])]
            new = [stored(v) for v in stage.prox(maps, z, a, self.alpha, self.gamma, local_steps=local_steps)]
            new = [v if lin.bias is None else v.sub_(lin.bias.to(self.dtype)) for v, lin in zip(new, stage.linears)]
            return [weigh(v, self.weights, c) for v in new], weigh(x, self.weights, c)

        return accumulate_products(self.n, self.sweep_chunk, self.chunk, part), escalations

    def update_preactivation(self, l: int, weights: list[list[torch.Tensor]], local_steps: int | None = None) -> None:
        """Elementwise proximal update of the pre-activations ``z_l`` given ``a_l`` (``stage.prox``;
        ``local_steps``: Newton steps of the local update, None for the global search)."""
        stage, x_all = self.chain.stages[l], self.stage_input(l)
        for c in token_chunks(self.n, self.update_chunk(max(p.shape[1] for p in self.pres[l]))):
            x = x_all[c].to(self.dtype)
            maps = [apply_linear(x, w, lin) for lin, w in zip(stage.linears, weights[l])]
            pres = [p[c].to(self.dtype) for p in self.pres[l]]
            new = stage.prox(maps, pres, self.acts[l][c].to(self.dtype), self.alpha, self.gamma,
                             local_steps=local_steps)
            for store, value in zip(self.pres[l], new):
                store[c] = value.to(self.storage)


def sparsellm(
    chain: Chain,
    inputs: torch.Tensor,
    pattern: Patterns,
    config: SparseLLMConfig | None = None,
    *,
    solver: str = "sparsegpt",
    solver_options: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    storage_dtype: torch.dtype | None = None,
    progress: bool = False,
    token_weights: torch.Tensor | None = None,
    heldout: torch.Tensor | None = None,
    **overrides: Any,
) -> ChainResult:
    """Prune every linear of ``chain`` jointly (module docstring); weights are written into its modules.

    - ``pattern``: one for every linear, or one per linear name (a per-linear allocation; the ridge
      then applies per linear, by its own sparsity).
    - ``inputs``: calibration inputs of the chain, ``N x n`` (tokens as rows); inside
      ``distributed.token_sharded()`` this rank's share, every token sum then covering all ranks'.
    - ``solver``: per-layer masked solver of each coordinated pass and of the one-shot start (``SOLVERS``).
    - ``config``: the coordinator's settings (``SparseLLMConfig``, default ``SparseLLMConfig()``);
      ``overrides`` replace single fields of it (``iterations=2``, ``alpha=0.1``, ...). ``refine``'s
      ``refine_iter`` None chooses by cost: each conjugate-gradient iteration costs ``2 m n^2`` flops, a
      pass of the linear over the ``N`` calibration tokens ``2 N m n``, so ``min(REFINE_ITER_MAX, N // n)``
      iterations cost at most one such pass (4 on SmolLM2 with 32,768 tokens; none for a 7B down
      projection with 8,192).
    - ``solver_options``: passed to every masked solve (e.g. ``damp``, ``blocksize``); the refits take
      only ``damp`` from it.
    - ``token_weights`` (``N``): a token of weight ``w`` counts as ``w^2`` copies of itself in the
      objective, every Gram and cross-covariance and the errors (an MoE expert's tokens, weighted as
      the router weights its output); the per-token auxiliary updates are unchanged by it.
    - ``chunk_size``: tokens per chunk for every per-token computation (None = all at once).
    - ``storage_dtype``: dtype of the stored activations (default: the inputs' dtype). When it is
      float32, the auxiliaries are stored in ``config.aux_dtype`` (so is the passes' activation before
      the output linear, which borrows an auxiliary's storage); every product and solve reads them in
      the compute dtype, and the dense target comes from the unrounded forward.
    - ``heldout`` (``N_h x n``): tokens kept out of every fit; the candidates are chosen by their error on
      them (module docstring).
    """
    config = SparseLLMConfig.with_options(config or SparseLLMConfig(), overrides)
    started = time.perf_counter()
    dtype = compute_dtype_for(inputs)
    storage = storage_dtype or inputs.dtype
    options = dict(solver_options or {})
    method = get_solver(solver)
    damp = options.get("damp", 0.01)
    fixed_mask = _fixed_mask_solver(config.refine, config.refine_tol, config.refine_iter, _token_count(inputs))
    held = _held_out(chain, heldout, chunk_size, dtype)
    aux = getattr(torch, config.aux_storage(str(storage).removeprefix("torch.")))
    state = CoordinatorState(chain, inputs, dtype, aux, chunk_size, config.alpha, config.beta, config.gamma,
                             token_weights, keep_preactivations=not recompute_preactivations(inputs.device, config.preactivations))
    reference = squared_norm(state.target, chunk_size, token_weights)

    start = layerwise(chain, inputs, pattern, solver, state.target, solver_options=options, dtype=dtype, storage_dtype=storage,
                      chunk_size=chunk_size, first_gram=state.input_gram, token_weights=token_weights,
                      last_input=state.lendable)
    best, best_error, best_iteration = start, start.error, 0
    start_error = best_error
    start_held = best_held = None if held is None else held.error(start.weights)
    current = start
    history: list[dict[str, Any]] = []
    local_steps = config.prox_steps if config.prox == "local" else None
    for iteration in tqdm(range(1, config.iterations + 1), desc="sparsellm", disable=not progress):
        tick = time.perf_counter()
        weights = current.weights
        objective_trace: list[tuple[str, float]] = []
        crosses: list[torch.Tensor] | None = None
        if iteration == config.iterations and state.last == 1 and not config.trace:
            # the last iteration of an FFN: one sweep, no auxiliary stored (module docstring)
            state.release_lendable()
            crosses, escalations = state.fused_updates(weights, local_steps)
            state.release_auxiliaries()
        else:
            state.restore_preactivations()

            def record(block: str) -> None:
                if config.trace:
                    objective_trace.append((block, state.objective(weights)))

            record("weights")
            escalations = 0
            for l in range(state.last - 1, -1, -1):
                escalations += state.update_activation(l, weights)
                record(f"activation {l}")
                state.update_preactivation(l, weights, local_steps)
                record(f"preactivation {l}")

        def solve(l: int, j: int, linear: LinearMap, h: torch.Tensor, acts: torch.Tensor) -> LayerSolution:
            own = pattern_for(pattern, linear.name)
            ridge = config.ridge_at(own.sparsity)
            if crosses is not None and l == 0:
                cross, crosses[j] = crosses[j], None        # the sweep's, freed once its solve is done
            else:
                cross = state.cross(state.stage_targets(l)[j], linear, acts)
            if iteration == config.iterations and l < state.last:
                state.release_preactivation(l, j)
            if config.trust > 0:
                cross = trust_region_cross(cross, start.weights[l][j].to(dtype), h, config.trust)
            previous = current.solutions[linear.name]

            def rows_solve(rows: slice) -> LayerSolution:
                # one problem (factor, W*) per linear, shared by the masked solve and the refit
                anchor = None if ridge is None else start.weights[l][j][rows]
                problem = LayerProblem.build(linear.weight[rows], h, target=cross[rows], damp=damp + (ridge or 0.0),
                                             compute_dtype=dtype, anchor=anchor)
                if not config.reselect_mask:
                    return fixed_mask(problem, previous.mask[rows], previous.weight[rows], None)
                sol = method(linear.weight[rows], h, own, problem=problem, **options)
                return sol if fixed_mask is None else fixed_mask(problem, sol.mask, sol.weight, sol)

            separable = row_separable(solver, None if not config.reselect_mask else own)
            return solve_rows(rows_solve, linear.weight.shape[0], separable)

        if iteration == config.iterations:
            state.release_lendable()
        current = sequential_pass(chain, inputs, solve, state.target, dtype=dtype, storage_dtype=storage, chunk_size=chunk_size,
                                  first_gram=state.input_gram, token_weights=token_weights, last_input=state.lendable)
        error = current.error
        held_error = None if held is None else held.error(current.weights)
        history.append({"iteration": iteration, "objective_trace": objective_trace, "error": error,
                        "relative_error": error / reference if reference > 0 else 0.0,
                        "heldout_relative_error": None if held is None else held_error / max(held.reference, 1e-300),
                        "ridge_escalations": escalations, "seconds": time.perf_counter() - tick,
                        "refine_iterations": {name: sol.info.get("cg_iterations") for name, sol in current.solutions.items()},
                        "refine_residual": {name: sol.info.get("cg_residual") for name, sol in current.solutions.items()}})
        if (error < best_error) if held is None else (held_error < best_held):
            best, best_error, best_held, best_iteration = current, error, held_error, iteration

    for stage, ws in zip(chain.stages, best.weights):
        for lin, w in zip(stage.linears, ws):
            lin.assign(w)
    return ChainResult(best.solutions, best_error, reference, start_error, history, best_iteration,
                       time.perf_counter() - started, best_held, None if held is None else held.reference, start_held)


def _fixed_mask_solver(refine: str, tol: float, max_iter: int | None, n_tokens: int) -> Callable[..., LayerSolution] | None:
    """``solve(problem, mask, start, solution) -> LayerSolution`` for ``refine`` (None for ``"none"``):
    the refit of ``problem`` on ``mask`` from the weights ``start``, or ``solution`` (the solver's, on
    the same problem) as it is when the cost rule allows no iteration. ``max_iter`` None:
    ``min(REFINE_ITER_MAX, n_tokens // n)`` for a linear with ``n`` inputs, at least 1 on fixed masks."""
    if refine == "none":
        return None

    def solve(problem: LayerProblem, mask: torch.Tensor, start: torch.Tensor, solution: LayerSolution | None) -> LayerSolution:
        w, h = problem.w_star, problem.gram
        if refine == "exact":
            return refit(w, h, mask, problem=problem)
        iterations = max_iter if max_iter is not None else min(REFINE_ITER_MAX, n_tokens // w.shape[1])
        if solution is None:
            iterations = max(1, iterations)
        elif iterations == 0:
            return solution
        return cg_refit(w, h, mask, start=start, tol=tol, max_iter=iterations, problem=problem)

    return solve


def prune_chain(chain: Chain, inputs: torch.Tensor, config: PruneConfig, *, language_model: bool = False,
                progress: bool = False, token_weights: torch.Tensor | None = None,
                heldout: torch.Tensor | None = None, patterns: Mapping[str, Pattern] | None = None) -> ChainResult:
    """Prune a chain as ``config`` says: ``"sparsellm"`` coordinates it (``config.coordinator``; the
    language-model defaults when ``language_model``), a per-layer solver prunes one linear after the
    other. ``token_weights``, ``heldout``: see ``sparsellm`` (a per-layer solver only reports the
    held-out error: it has no candidates to choose among); ``patterns``: one per linear name instead of
    ``config.pattern`` (a per-linear allocation)."""
    pattern, options = config.pattern if patterns is None else patterns, config.solve_options()
    storage = None if config.storage_dtype is None else getattr(torch, config.storage_dtype)
    if config.method == "sparsellm":
        return sparsellm(chain, inputs, pattern, config.coordinator(language_model), solver=config.solver,
                         solver_options=options, chunk_size=config.chunk_size, storage_dtype=storage, progress=progress,
                         token_weights=token_weights, heldout=heldout)
    started = time.perf_counter()
    _token_count(inputs)
    dtype = compute_dtype_for(inputs)
    width = chain.stages[-1].linear.weight.shape[0]
    target = map_tokens(inputs.shape[0], config.chunk_size, lambda c: chain.forward(inputs[c].to(dtype)),
                        torch.empty(inputs.shape[0], width, dtype=dtype, device=inputs.device))
    held = _held_out(chain, heldout, config.chunk_size, dtype)
    result = layerwise(chain, inputs, pattern, config.method, target, solver_options=options, dtype=dtype,
                       storage_dtype=storage or inputs.dtype, chunk_size=config.chunk_size, token_weights=token_weights)
    for stage, ws in zip(chain.stages, result.weights):
        for lin, w in zip(stage.linears, ws):
            lin.assign(w)
    error = result.error
    held_error = None if held is None else held.error(result.weights)
    return ChainResult(result.solutions, error, squared_norm(target, config.chunk_size, token_weights), error, [], 0,
                       time.perf_counter() - started, held_error, None if held is None else held.reference, held_error)
