"""Typed per-layer records of a decoder pruning run (what ``report.json``'s ``layers_detail`` holds).

``LinearRecord`` per pruned linear, ``FFNRecord`` for the FFN chain as a whole (errors relative to the
dense FFN's output on the pruned layer's inputs), ``LayerRecord`` per decoder layer. ``to_dict`` and
``from_dict`` give and read the JSON form (reports, per-layer checkpoints).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sparsesolve.core.coordinator import ChainResult
from sparsesolve.core.solvers import LayerSolution

__all__ = ["ExpertRecord", "FFNRecord", "LayerRecord", "LinearRecord"]


@dataclass(frozen=True)
class LinearRecord:
    """One linear's solve: relative error ``||(W - W*) X||^2 / ||W* X||^2``, achieved sparsity, damping
    used and its escalations, wall seconds."""

    relative_error: float
    sparsity: float
    escalations: int
    damping: float
    seconds: float

    @classmethod
    def from_solution(cls, solution: LayerSolution) -> LinearRecord:
        """The record of a solver's result."""
        return cls(solution.relative_error, solution.sparsity, solution.escalations, solution.damping, solution.seconds)


@dataclass(frozen=True)
class FFNRecord:
    """The FFN chain: final and one-shot-start relative errors of its output, the chosen iteration (0 =
    the start), per-iteration errors, seconds and conjugate-gradient iterations per linear; with
    held-out windows the same errors on them (``heldout_*``, None without)."""

    relative_error: float
    start_relative_error: float
    best_iteration: int
    iterations: int
    seconds: float
    iteration_errors: list[float] = field(default_factory=list)
    iteration_seconds: list[float] = field(default_factory=list)
    refine_iterations: list[dict[str, int | None]] = field(default_factory=list)
    heldout_relative_error: float | None = None
    start_heldout_relative_error: float | None = None
    iteration_heldout_errors: list[float | None] = field(default_factory=list)

    @classmethod
    def from_chain(cls, result: ChainResult) -> FFNRecord:
        """The record of a chain result."""
        start = result.start_error / result.reference if result.reference > 0 else 0.0
        held_start = None
        if result.start_heldout_error is not None and result.heldout_reference:
            held_start = result.start_heldout_error / result.heldout_reference
        return cls(result.relative_error, start, result.best_iteration, len(result.history), result.seconds,
                   [h["relative_error"] for h in result.history], [h["seconds"] for h in result.history],
                   [h.get("refine_iterations", {}) for h in result.history], result.heldout_relative_error,
                   held_start, [h.get("heldout_relative_error") for h in result.history])


@dataclass(frozen=True)
class ExpertRecord:
    """One routed expert: how many calibration tokens the router sent it, the method that pruned it (the
    configured one, or the layer-wise fallback for too few tokens) and its weighted relative error."""

    expert: int
    tokens: int
    method: str
    relative_error: float

    @classmethod
    def from_chain(cls, expert: int, tokens: int, method: str, result: ChainResult) -> ExpertRecord:
        """The record of an expert's chain result."""
        return cls(expert, tokens, method, result.relative_error)


@dataclass(frozen=True)
class LayerRecord:
    """Decoder layer ``layer``: its linears' records by name, its dense FFN (None in an MoE layer without
    a shared expert), its solve seconds and its routed experts."""

    layer: int
    linears: dict[str, LinearRecord]
    ffn: FFNRecord | None
    solve_seconds: float
    experts: list[ExpertRecord] = field(default_factory=list)

    @property
    def escalations(self) -> int:
        """Damping escalations over the layer's solves."""
        return sum(record.escalations for record in self.linears.values())

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerRecord:
        """Read the JSON form back."""
        return cls(data["layer"], {k: LinearRecord(**v) for k, v in data["linears"].items()},
                   None if data["ffn"] is None else FFNRecord(**data["ffn"]), data["solve_seconds"],
                   [ExpertRecord(**e) for e in data.get("experts", [])])
