"""Layer-by-layer pruning of a decoder-only language model, in true sequence.

1. Run the model on the calibration windows up to decoder layer 0 and keep its inputs (hidden states
   plus the keyword arguments the model passes: attention mask, rotary embeddings, ...).
2. For each decoder layer ``l``:
   a. for each attention group (``[q, k, v]``, then ``[o]``): run the layer up to the group, streaming
      the Gram ``H = X^T X`` of the group's input, and prune every linear of the group with the
      per-layer solver; ``o``'s input therefore comes from the already-pruned ``q, k, v``;
   b. run the layer up to its FFN and keep the FFN inputs, which come from the pruned attention (the
      original SparseLLM code used the dense attention's outputs here), and prune the FFN chain with
      the chosen method (``"sparsellm"`` coordinates up/gate/down or fc1/fc2 against the dense FFN's
      output on those inputs; the layer-wise methods prune one linear after the other);
   c. run the pruned layer to get the inputs of layer ``l + 1``.
   Layers outside ``layers`` are only run (step c).

Peak memory is the model, the hidden states of every calibration token (``N x d``, twice during
step c), the FFN inputs (``N x d``) and the FFN workspace (for sparsellm about four ``N x d_ff``
arrays in the storage dtype): it grows linearly with the number of calibration tokens and does not
depend on the number of layers.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsesolve.adapters import DecoderLayerMap, get_adapter
from sparsesolve.checkpoint import LayerCheckpoints
from sparsesolve.coordinator import ChainResult, prune_chain
from sparsesolve.evaluate import check_seq_len
from sparsesolve.linalg import compute_dtype_for
from sparsesolve.patterns import Pattern
from sparsesolve.solvers import SOLVERS, LayerSolution, get_solver
from sparsesolve.streaming import DEFAULT_CHUNK

__all__ = ["DECODER_SPARSELLM_DEFAULTS", "PruneResult", "prune_decoder", "select_layers", "check_prunable"]

#: sparsellm defaults for language models (benchmarks/README.md, the study): one coordinator iteration
#: (on SmolLM2 at 70 % the first gives 95 % of four iterations' error reduction, each further one costs
#: more than sparsegpt's whole layer), alpha = 0.1 (pre-activations held less tightly to the linear maps'
#: outputs than gamma holds the activations: lower FFN error than alpha = gamma on every layer and
#: pattern measured), the local proximal update (same error as the global search at a third of its
#: cost), conjugate-gradient refits with iterations chosen by cost (``coordinator.sparsellm``), no
#: objective trace (a pass over the tokens per block update).
DECODER_SPARSELLM_DEFAULTS: dict[str, Any] = {"iterations": 1, "alpha": 0.1, "prox": "local", "trace": False}


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input has been seen."""


@dataclass
class PruneResult:
    """Result of pruning a decoder model.

    - ``layers``: one JSON-ready record per pruned decoder layer (per-linear relative errors,
      sparsity, damping escalations, the FFN's start and final errors, timings).
    - ``masks``: boolean keep-masks ``(out, in)`` by full module name.
    - ``seconds`` (wall), ``forward_seconds`` (capturing inputs, propagating), ``solve_seconds``.
    """

    layers: list[dict[str, Any]]
    masks: dict[str, torch.Tensor]
    seconds: float = 0.0
    forward_seconds: float = 0.0
    solve_seconds: float = 0.0
    resumed_layers: list[int] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over every pruned linear."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / max(total, 1)

    @property
    def escalations(self) -> int:
        """Damping escalations over every solve (0 on a healthy run)."""
        return sum(lin["escalations"] for rec in self.layers for lin in rec["linears"].values())


def select_layers(spec: str | Sequence[int] | range | None, count: int) -> list[int]:
    """Layer indices from ``None`` (all), a sequence, or a string ``"0:15"`` / ``"3"`` / ``"first-half"``."""
    if spec is None or spec == "all":
        return list(range(count))
    if isinstance(spec, str):
        if spec == "first-half":
            return list(range(count // 2))
        try:
            if ":" in spec:
                lo, hi = (int(p) if p else d for p, d in zip(spec.split(":", 1), (0, count)))
                indices = list(range(lo, hi))
            else:
                indices = [int(p) for p in spec.split(",")]
        except ValueError:
            raise ValueError(f"layers {spec!r} not understood; use 'all', 'first-half', 'A:B' or 'i,j,k'") from None
    else:
        indices = list(spec)
    if not indices or any(not 0 <= i < count for i in indices):
        raise ValueError(f"layers {spec!r} must select layers in 0..{count - 1}")
    return sorted(set(indices))


@dataclass
class _LayerInputs:
    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


def check_prunable(model: nn.Module, pattern: Pattern, layers: str | Sequence[int] | None = None) -> list[int]:
    """The selected layer indices, after checking the model family is supported and ``pattern`` fits
    every linear of them (one-line errors naming the offending module)."""
    adapter = get_adapter(model)
    chosen = select_layers(layers, len(adapter.layers(model)))
    for index in chosen:
        for lin in adapter.layer_map(model, index).linears:
            try:
                pattern.validate(tuple(lin.weight.shape))
            except ValueError as error:
                raise ValueError(f"{lin.name}: {error}") from None
    return chosen


def _capture_first_inputs(model: nn.Module, layer: nn.Module, windows: torch.Tensor, batch_size: int,
                          storage: torch.dtype, device: torch.device) -> _LayerInputs:
    inputs = _LayerInputs([], [])

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.hidden.append(hidden.detach().to(device=device, dtype=storage))
        inputs.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    model_device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(model_device), use_cache=False)
            except _Stop:
                continue
            raise RuntimeError("the first decoder layer was never called")
    finally:
        handle.remove()
    return inputs


def _run(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    out = layer(hidden.to(dtype), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _feed(layer: nn.Module, module: nn.Module, inputs: _LayerInputs, dtype: torch.dtype,
          consume: Callable[[torch.Tensor], None]) -> None:
    """Run ``layer`` on every batch until ``module`` is called; hand its input (tokens x width) to ``consume``."""

    def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        consume(x.detach().reshape(-1, x.shape[-1]))
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            try:
                _run(layer, hidden, kwargs, dtype)
            except _Stop:
                continue
            raise RuntimeError(f"{type(module).__name__} was not called by its decoder layer")
    finally:
        handle.remove()


def _solution_record(sol: LayerSolution) -> dict[str, Any]:
    return {"relative_error": sol.relative_error, "sparsity": sol.sparsity, "escalations": sol.escalations,
            "damping": sol.damping, "seconds": sol.seconds}


class _LayerPruner:
    """Prunes one decoder layer at a time (module docstring, step 2)."""

    def __init__(self, pattern: Pattern, method: str, solver: str, solver_options: dict[str, Any],
                 sparsellm_options: dict[str, Any], chunk_size: int | None, storage: torch.dtype,
                 dtype: torch.dtype) -> None:
        self.pattern, self.method, self.chunk, self.storage, self.dtype = pattern, method, chunk_size, storage, dtype
        self.attention_solver = get_solver(solver if method == "sparsellm" else method)
        self.solver_options = solver_options
        self.chain_options = ({**DECODER_SPARSELLM_DEFAULTS, **sparsellm_options, "solver": solver}
                              if method == "sparsellm" else {})
        self.forward_seconds = 0.0

    @contextmanager
    def forward_pass(self) -> Iterator[None]:
        """Count the enclosed wall time as forward-pass time."""
        tick = time.perf_counter()
        yield
        self.forward_seconds += time.perf_counter() - tick

    def _timed_feed(self, layer: nn.Module, module: nn.Module, inputs: _LayerInputs,
                    consume: Callable[[torch.Tensor], None]) -> None:
        with self.forward_pass():
            _feed(layer, module, inputs, self.dtype, consume)

    def prune(self, layer: nn.Module, lmap: DecoderLayerMap, inputs: _LayerInputs) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Prune attention groups then the FFN in place; returns the layer's record and masks."""
        linears: dict[str, dict[str, Any]] = {}
        masks: dict[str, torch.Tensor] = {}
        solve_seconds = 0.0
        for group in lmap.attention:
            weight = group[0].weight
            compute = compute_dtype_for(weight)
            gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=compute, device=weight.device)
            self._timed_feed(layer, group[0].module, inputs, lambda x, c=compute, g=gram: g.addmm_(x.to(c).T, x.to(c)))
            for lin in group:
                sol = self.attention_solver(lin.weight, gram, self.pattern, compute_dtype=compute, **self.solver_options)
                lin.assign(sol.weight)
                linears[lin.name], masks[lin.name] = _solution_record(sol), sol.mask
                solve_seconds += sol.seconds
        parts: list[torch.Tensor] = []
        self._timed_feed(layer, lmap.ffn_input, inputs, lambda x: parts.append(x.to(self.storage)))
        ffn_inputs = torch.cat(parts)
        parts.clear()
        result = prune_chain(lmap.ffn, ffn_inputs, self.pattern, method=self.method, solver_options=self.solver_options,
                             chunk_size=self.chunk, **self.chain_options)
        for name, sol in result.solutions.items():
            linears[name], masks[name] = _solution_record(sol), sol.mask
        record = {"linears": linears, "ffn": _chain_record(result), "solve_seconds": solve_seconds + result.seconds}
        return record, masks


def _chain_record(result: ChainResult) -> dict[str, Any]:
    start = result.start_error / result.reference if result.reference > 0 else 0.0
    return {"relative_error": result.relative_error, "start_relative_error": start,
            "best_iteration": result.best_iteration, "iterations": len(result.history), "seconds": result.seconds,
            "iteration_errors": [h["relative_error"] for h in result.history],
            "iteration_seconds": [h["seconds"] for h in result.history],
            "refine_iterations": [h.get("refine_iterations", {}) for h in result.history]}


def _fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()[:16]


def prune_decoder(
    model: nn.Module,
    calibration: torch.Tensor,
    pattern: Pattern,
    *,
    method: str = "sparsellm",
    layers: str | Sequence[int] | None = None,
    solver: str = "sparsegpt",
    solver_options: dict[str, Any] | None = None,
    sparsellm_options: dict[str, Any] | None = None,
    batch_size: int = 8,
    storage_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    chunk_size: int | None = DEFAULT_CHUNK,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Prune a transformers decoder-only causal LM in place, layer by layer (module docstring).

    - ``calibration``: token ids, ``n_windows x seq_len`` (``sparsesolve.data.calibration_windows``).
    - ``method``: ``"sparsellm"`` or a per-layer solver (``SOLVERS``); attention linears always use a
      per-layer solver (``solver`` under sparsellm, else ``method``).
    - ``layers``: which decoder layers to prune (``select_layers``: ``None`` = all, ``"first-half"`` = the
      SparseLLM paper's setting, ``"0:15"``, a list); the others keep their dense weights.
    - ``solver_options``: for every per-layer solve (e.g. ``{"damp": 0.01}``); ``sparsellm_options``:
      ``iterations``, ``alpha``, ``beta``, ``gamma``, ``reselect_mask``, ``refine``, ``refine_tol``, ``refine_iter``, ``prox``,
      ``prox_steps`` for the FFN coordinator (defaults ``DECODER_SPARSELLM_DEFAULTS``).
    - ``batch_size``: windows per forward pass; ``storage_dtype``: dtype of stored activations (default
      the model's; ``torch.bfloat16`` halves activation memory; solves stay float32); ``device``: where
      layers are processed (default: the model's device); ``chunk_size``: tokens per chunk in the FFN solve.
    - ``checkpoint_dir``: save every pruned layer there; ``resume=True`` continues from its checkpoints
      and ends with the same weights as an uninterrupted run.
    """
    adapter = get_adapter(model)
    decoder = adapter.layers(model)
    if method != "sparsellm" and method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; choose one of sparsellm, {', '.join(SOLVERS)}")
    if method != "sparsellm" and sparsellm_options:
        raise ValueError(f"options {sorted(sparsellm_options)} apply to method 'sparsellm' only")
    get_solver(solver)
    if calibration.dim() != 2 or calibration.numel() == 0 or calibration.dtype != torch.long:
        raise ValueError(f"calibration must be a non-empty n_windows x seq_len tensor of token ids, got "
                         f"{tuple(calibration.shape)} {calibration.dtype}")
    check_seq_len(model, calibration.shape[1])
    chosen = check_prunable(model, pattern, layers)
    widest = max(lin.weight.shape[1] for lin in adapter.layer_map(model, chosen[0]).linears)
    if method == "sparsellm" and calibration.numel() < 2 * widest:
        warnings.warn(f"{calibration.numel()} calibration tokens for linears with {widest} inputs: sparsellm can over-fit "
                      "so few tokens (its calibration error falls while perplexity rises); use at least "
                      f"{2 * widest} tokens", stacklevel=2)
    started = time.perf_counter()
    model_dtype = next(model.parameters()).dtype
    storage = storage_dtype or model_dtype
    device = torch.device(device) if device is not None else next(model.parameters()).device
    checkpoints = None
    done: set[int] = set()
    if checkpoint_dir is not None:
        settings = {"model": getattr(model.config, "_name_or_path", ""), "model_type": model.config.model_type,
                    "method": method, "pattern": str(pattern), "layers": chosen, "solver": solver,
                    "solver_options": repr(sorted((solver_options or {}).items())),
                    "sparsellm_options": repr(sorted((sparsellm_options or {}).items())),
                    "calibration": _fingerprint(calibration), "storage_dtype": str(storage), "chunk_size": chunk_size}
        checkpoints = LayerCheckpoints(checkpoint_dir, settings)
        done = set(checkpoints.open(resume))
    pruner = _LayerPruner(pattern, method, solver, dict(solver_options or {}), dict(sparsellm_options or {}),
                          chunk_size, storage, model_dtype)
    with torch.no_grad():
        with pruner.forward_pass():
            inputs = _capture_first_inputs(model, decoder[0], calibration, batch_size, storage, device)
        records, masks, solve_seconds = [], {}, 0.0
        bar = tqdm(range(chosen[-1] + 1), desc="layers", unit="layer", disable=not progress)
        for index in bar:
            layer = decoder[index]
            home = next(layer.parameters()).device
            layer.to(device)
            if index in chosen:
                lmap = adapter.layer_map(model, index)
                if index in done:
                    record, layer_masks = _restore(lmap, checkpoints.load(index))
                else:
                    record, layer_masks = pruner.prune(layer, lmap, inputs)
                    record = {"layer": index, **record}
                    if checkpoints is not None:
                        checkpoints.save(index, {lin.name: lin.weight for lin in lmap.linears}, layer_masks, record)
                    solve_seconds += record["solve_seconds"]
                records.append(record)
                masks.update(layer_masks)
                bar.set_postfix(ffn_error=f"{record['ffn']['relative_error']:.4f}")
            if index < chosen[-1]:
                with pruner.forward_pass():
                    inputs.hidden = [_run(layer, h, kw, model_dtype).to(storage) for h, kw in zip(inputs.hidden, inputs.kwargs)]
            layer.to(home)
    return PruneResult(records, masks, time.perf_counter() - started, pruner.forward_seconds, solve_seconds,
                       sorted(done & set(chosen)))


def _restore(lmap: DecoderLayerMap, saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Write a checkpoint's weights into the layer; its record and masks."""
    for lin in lmap.linears:
        lin.assign(saved["weights"][lin.name].to(lin.weight.device))
    return saved["record"], {k: v.bool() for k, v in saved["masks"].items()}
