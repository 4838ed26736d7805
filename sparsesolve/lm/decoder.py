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
      output on those inputs; the layer-wise methods prune one linear after the other); in an MoE
      layer, capture the experts module's arguments (tokens, top-k indices and weights) and prune every
      expert's chain on the tokens routed to it, each weighted by its router weight (fewer tokens than
      the expert's widest input: the layer-wise solver; none: magnitude);
   c. run the pruned layer to get the inputs of layer ``l + 1``.
   Layers outside ``layers`` are only run (step c). With ``true_sequential=False`` steps a and b take
   every group's inputs from one pass of the dense layer before anything in it is pruned (the
   original SparseGPT and Wanda code: later linears are fitted to the dense layer's inputs);
   step c and the next layers still see the pruned layer.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsesolve.core import distributed
from sparsesolve.core.chain import Chain, LinearMap
from sparsesolve.core.config import PruneConfig
from sparsesolve.core.coordinator import ChainResult, prune_chain
from sparsesolve.core.linalg import compute_dtype_for
from sparsesolve.core.patterns import Pattern, Unstructured, pattern_for
from sparsesolve.core.quantize import QuantizationGrid
from sparsesolve.core.solvers import get_solver
from sparsesolve.core.solvers.row_share import row_separable, solve_rows
from sparsesolve.lm.adapters import DecoderLayerMap, get_adapter
from sparsesolve.lm.allocation import allocate, layer_statistics, sparsity_grid
from sparsesolve.lm.checkpoint import LayerCheckpoints
from sparsesolve.lm.environment import release_free_memory
from sparsesolve.lm.fisher import FISHER_BATCH, output_fisher
from sparsesolve.lm.layer_inputs import LayerInputs, capture_first_inputs, feed, run_layer
from sparsesolve.lm.models import check_seq_len
from sparsesolve.lm.records import ExpertRecord, FFNRecord, LayerRecord, LinearRecord

__all__ = ["PruneResult", "prune_decoder", "select_layers", "check_prunable"]

@dataclass
class PruneResult:
    """Result of pruning a decoder model.

    - ``layers``: one ``LayerRecord`` per pruned decoder layer (per-linear relative errors, sparsity,
      damping escalations, the FFN's start and final errors, timings).
    - ``masks``: boolean keep-masks ``(out, in)`` by full module name; ``grids``: the quantisation grid of
      every linear a quantising solve produced (empty otherwise), by the same names.
    - ``seconds`` (wall), ``forward_seconds`` (capturing inputs, propagating), ``solve_seconds``.
    - ``resumed_layers``: layers read back from checkpoints instead of pruned again.
    - ``allocation``: the requested sparsity under a non-uniform ``config.allocation`` of each pruned
      layer (by index) or, with ``config.allocation_unit="linear"``, of each pruned linear (by name);
      empty for uniform.
    """

    layers: list[LayerRecord]
    masks: dict[str, torch.Tensor]
    grids: dict[str, QuantizationGrid] = field(default_factory=dict)
    seconds: float = 0.0
    forward_seconds: float = 0.0
    solve_seconds: float = 0.0
    resumed_layers: list[int] = field(default_factory=list)
    allocation: dict[int | str, float] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over every pruned linear."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / max(total, 1)

    @property
    def escalations(self) -> int:
        """Damping escalations over every solve (0 on a healthy run)."""
        return sum(record.escalations for record in self.layers)


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


def check_prunable(model: nn.Module, pattern: Pattern, layers: str | Sequence[int] | None = None,
                   allocation_unit: str = "layer") -> list[int]:
    """The selected layer indices, after checking the model family is supported, ``pattern`` fits
    every linear of them and, for ``allocation_unit="linear"``, none has MoE experts (one-line errors
    naming the offending module or layer)."""
    adapter = get_adapter(model)
    chosen = select_layers(layers, len(adapter.layers(model)))
    for index in chosen:
        lmap = adapter.layer_map(model, index)
        if allocation_unit == "linear" and lmap.experts is not None:
            raise ValueError(f"allocation_unit 'linear' gives each linear its own sparsity, but layer {index} has "
                             "MoE experts, which it does not cover; use allocation_unit 'layer'")
        for lin in lmap.linears:
            try:
                pattern.validate(tuple(lin.weight.shape))
            except ValueError as error:
                raise ValueError(f"{lin.name}: {error}") from None
    return chosen


class _LayerPruner:
    """Prunes one decoder layer at a time (module docstring, step 2)."""

    def __init__(self, config: PruneConfig, storage: torch.dtype, dtype: torch.dtype) -> None:
        self.config, self.storage, self.dtype = config, storage, dtype
        name = config.solver if config.method == "sparsellm" else config.method
        self.attention_solver = get_solver(name)
        self.attention_separable = row_separable(name, config.pattern)
        self.solve_options = config.solve_options()
        self.forward_seconds = 0.0
        #: one pattern per linear name (a per-linear allocation), else None: ``config.pattern`` for all
        self.patterns: dict[str, Pattern] | None = None

    @contextmanager
    def forward_pass(self) -> Iterator[None]:
        """Count the enclosed wall time as forward-pass time."""
        tick = time.perf_counter()
        yield
        self.forward_seconds += time.perf_counter() - tick

    def _timed_feed(self, layer: nn.Module, module: nn.Module, inputs: LayerInputs,
                    consume: Callable[[Any], None], every_argument: bool = False) -> None:
        with self.forward_pass():
            feed(layer, module, inputs, self.dtype, consume, every_argument=every_argument)

    def prune(self, index: int, layer: nn.Module, lmap: DecoderLayerMap, inputs: LayerInputs,
              heldout: LayerInputs | None = None) -> _LayerOutcome:
        """Prune attention groups then the FFN in place; the layer's record, masks and grids. ``heldout``:
        the held-out windows' inputs, whose FFN inputs go to the coordinator for its choice."""
        outcome = _LayerOutcome(None, {}, {}, {})
        solve_seconds = 0.0
        # with true_sequential off, every linear's inputs come from the dense layer: all captured first
        grams = None if self.config.true_sequential else [self._attention_gram(layer, g, inputs) for g in lmap.attention]
        tokens = held = routed = None
        if lmap.ffn is not None and not self.config.true_sequential:
            tokens, held = self._ffn_inputs(layer, lmap, inputs, heldout)
        if lmap.experts is not None and not self.config.true_sequential:
            routed = self._expert_inputs(layer, lmap, inputs)
        for g, group in enumerate(lmap.attention):
            weight = group[0].weight
            compute = compute_dtype_for(weight)
            gram = self._attention_gram(layer, group, inputs) if grams is None else grams[g]
            for lin in group:
                pattern = pattern_for(self.patterns or self.config.pattern, lin.name)
                sol = solve_rows(lambda rows, w=lin.weight, p=pattern: self.attention_solver(
                    w[rows], gram, p, compute_dtype=compute, **self.solve_options),
                    lin.weight.shape[0], self.attention_separable)
                lin.assign(sol.weight)
                outcome.add(lin, sol)
                solve_seconds += sol.seconds
        ffn = None
        if lmap.ffn is not None:
            if tokens is None:
                tokens, held = self._ffn_inputs(layer, lmap, inputs, heldout)
            result = prune_chain(lmap.ffn, tokens, self.config, language_model=True, heldout=held, patterns=self.patterns)
            del tokens
            outcome.add_chain(lmap.ffn, result)
            ffn, solve_seconds = FFNRecord.from_chain(result), solve_seconds + result.seconds
        experts: list[ExpertRecord] = []
        if lmap.experts is not None:
            hidden, index, weights = self._expert_inputs(layer, lmap, inputs) if routed is None else routed
            for e, chain in enumerate(lmap.experts.chains):
                rows, slot = torch.nonzero(index == e, as_tuple=True)
                result, method, count = self._prune_expert(chain, hidden[rows], weights[rows, slot])
                outcome.add_chain(chain, result)
                experts.append(ExpertRecord.from_chain(e, count, method, result))
                solve_seconds += result.seconds
        outcome.record = LayerRecord(index, outcome.linears, ffn, solve_seconds, experts)
        return outcome

    def _attention_gram(self, layer: nn.Module, group: list[LinearMap], inputs: LayerInputs) -> torch.Tensor:
        """``X^T X`` of the inputs of an attention group (the layer as it stands), over every rank's tokens."""
        weight = group[0].weight
        compute = compute_dtype_for(weight)
        # each batch's Gram in the compute dtype, their sum in float64 (streaming.accumulate's rule)
        total = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
        self._timed_feed(layer, group[0].module, inputs, lambda x: total.add_(x.to(compute).T @ x.to(compute)))
        return distributed.reduce(total).to(compute)

    def _ffn_inputs(self, layer: nn.Module, lmap: DecoderLayerMap, inputs: LayerInputs,
                    heldout: LayerInputs | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The FFN's input tokens (``N x d``, storage dtype) and the held-out windows' (None without them)."""
        parts: list[torch.Tensor] = []
        self._timed_feed(layer, lmap.ffn_input, inputs, lambda x: parts.append(x.to(self.storage)))
        tokens = torch.cat(parts)
        parts.clear()                       # the batches are not held twice while the FFN is pruned
        held = None
        if heldout is not None:
            self._timed_feed(layer, lmap.ffn_input, heldout, lambda x: parts.append(x.to(self.storage)))
            held = torch.cat(parts) if parts else tokens.new_zeros(0, tokens.shape[1])
        return tokens, held

    def _expert_inputs(self, layer: nn.Module, lmap: DecoderLayerMap,
                       inputs: LayerInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The experts' inputs: hidden states (``N x d``, storage dtype), the router's choices and weights
        (``N x k`` each)."""
        assert lmap.experts is not None
        calls: list[tuple[torch.Tensor, ...]] = []
        self._timed_feed(layer, lmap.experts.module, inputs,
                         lambda args: calls.append((args[0].to(self.storage), *args[1:3])), every_argument=True)
        hidden, index, weights = (torch.cat([c[i] for c in calls]) for i in range(3))
        return hidden, index, weights

    def _prune_expert(self, chain: Chain, tokens: torch.Tensor, weights: torch.Tensor) -> tuple[ChainResult, str, int]:
        """One expert on the tokens routed to it, each weighted by its router weight; with fewer tokens
        than the expert's widest input the configured method falls back to the layer-wise solver
        (no token: magnitude, which needs none). Returns the result, the method used and the number of
        routed tokens (over all ranks when token sharded)."""
        widest = max(lin.weight.shape[1] for lin in chain.linears)
        method, routed = self.config.method, distributed.reduce_count(len(tokens))
        if routed == 0:
            method = "magnitude"
            tokens, weights = torch.zeros(1, chain.linears[0].weight.shape[1], dtype=self.storage), torch.ones(1)
        elif routed < widest and method == "sparsellm":
            method = self.config.solver
        config = self.config if method == self.config.method else replace(self.config, method=method, sparsellm=None)
        return prune_chain(chain, tokens, config, language_model=True, token_weights=weights.float()), method, routed


@dataclass
class _LayerOutcome:
    record: LayerRecord | None
    masks: dict[str, torch.Tensor]
    grids: dict[str, QuantizationGrid]
    linears: dict[str, LinearRecord]

    def add(self, linear: LinearMap, solution: Any) -> None:
        """Record one linear's solution: its record, its mask (placed in its parameter's) and its grid."""
        self.linears[linear.name] = LinearRecord.from_solution(solution)
        linear.place(self.masks, solution.mask)
        if solution.grid is not None:
            self.grids[linear.name] = solution.grid

    def add_chain(self, chain: Chain, result: ChainResult) -> None:
        """``add`` every linear of a pruned chain."""
        for lin in chain.linears:
            self.add(lin, result.solutions[lin.name])


def _fingerprint(windows: torch.Tensor) -> str:
    """A digest of every rank's calibration windows in rank order: the same for any split of one set."""
    return hashlib.sha256(b"".join(distributed.gather(windows.cpu().numpy().tobytes()))).hexdigest()[:16]


def prune_decoder(
    model: nn.Module,
    calibration: torch.Tensor,
    config: PruneConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Prune a transformers decoder-only causal LM in place, layer by layer (module docstring), as ``config`` says.

    - ``calibration``: token ids, ``n_windows x seq_len`` (``sparsesolve.lm.data.calibration_windows``).
    - ``config.method``: ``"sparsellm"`` or a per-layer solver; attention linears always use a per-layer
      solver (``config.solver`` under sparsellm, else the method); the FFN coordinator takes
      ``config.coordinator(language_model=True)``.
    - ``config.layers``: which decoder layers to prune (``select_layers``); the others keep their dense weights.
    - ``config.batch_size``: windows per forward pass; ``storage_dtype``: dtype of stored activations
      (default the model's; bfloat16 halves activation memory; solves stay float32); ``device``: where
      layers are processed (default the model's device); ``chunk_size``: tokens per chunk in the FFN solve.
    - ``config.allocation``: each layer's (``allocation_unit="linear"``: each linear's) sparsity of an
      unstructured target (``lm/allocation.py``: a dense pass over the windows first), returned as
      ``PruneResult.allocation``.
    - ``config.sparsellm.heldout_fraction``: that share of the windows (``HELDOUT_SEED``) is kept out of
      every fit, carried through the pruned layers and handed to each FFN coordinator, which chooses
      its candidate by the error on it (experts of an MoE layer choose on their fitted tokens).
    - ``checkpoint_dir``: save every pruned layer there; ``resume=True`` continues from its checkpoints
      and ends with the same weights as an uninterrupted run.

    Under an initialised ``torch.distributed`` process group with several ranks the run is token
    sharded (``core.distributed``): each rank passes its own share of the windows
    (``calibration[distributed.share(n_windows)]``), the ranks must agree on every setting (else the
    same one-line error on each), token sums are all-reduced, every rank ends with the same weights,
    and rank 0 alone writes the checkpoints.
    """
    with distributed.token_sharded():
        return _prune_layers(model, calibration, config, checkpoint_dir, resume, progress)


def _prune_layers(model: nn.Module, calibration: torch.Tensor, config: PruneConfig, checkpoint_dir: str | Path | None,
                  resume: bool, progress: bool) -> PruneResult:
    adapter = get_adapter(model)
    decoder = adapter.layers(model)
    tokens = distributed.reduce_count(calibration.numel())     # every rank joins, even one with bad input
    if calibration.dim() != 2 or calibration.dtype != torch.long or tokens == 0:
        raise ValueError(f"calibration must be a non-empty n_windows x seq_len tensor of token ids, got "
                         f"{tuple(calibration.shape)} {calibration.dtype}")
    check_seq_len(model, calibration.shape[1])
    chosen = check_prunable(model, config.pattern, config.layers, config.allocation_unit)
    model_dtype = next(model.parameters()).dtype
    storage = getattr(torch, config.storage_dtype) if config.storage_dtype else model_dtype
    settings = {"model": getattr(model.config, "_name_or_path", ""), "model_type": model.config.model_type,
                **config.to_dict(), "layers": chosen, "device": None, "batch_size": None,
                "calibration": _fingerprint(calibration), "storage_dtype": str(storage)}
    if settings["sparsellm"] is not None:   # where the pre-activations live changes memory, not the weights
        settings["sparsellm"] = {k: v for k, v in settings["sparsellm"].items() if k != "preactivations"}
    distributed.agree({**settings, "calibration": None, "seq_len": calibration.shape[1], "resume": resume,
                       "checkpoint_dir": None if checkpoint_dir is None else str(Path(checkpoint_dir).absolute())})
    widest = max(lin.weight.shape[1] for lin in adapter.layer_map(model, chosen[0]).linears)
    if config.method == "sparsellm" and tokens < 2 * widest and distributed.is_main():
        warnings.warn(f"{tokens} calibration tokens for linears with {widest} inputs: sparsellm can over-fit "
                      "so few tokens (its calibration error falls while perplexity rises); use at least "
                      f"{2 * widest} tokens", stacklevel=3)
    started = time.perf_counter()
    device = torch.device(config.device) if config.device is not None else next(model.parameters()).device
    checkpoints = None
    done: set[int] = set()
    if checkpoint_dir is not None:
        checkpoints = LayerCheckpoints(checkpoint_dir, settings, defaults=PruneConfig(config.pattern).to_dict())
        done = set(distributed.on_main(lambda: checkpoints.open(resume)))
    pruner = _LayerPruner(config, storage, model_dtype)
    with torch.no_grad():
        calibration, held_windows = _split_heldout(calibration, config)
        sparsities = _allocate(model, adapter, chosen, calibration, config, storage, model_dtype, device, pruner)
        with pruner.forward_pass():
            inputs = capture_first_inputs(model, decoder[0], calibration, config.batch_size, storage, device)
            heldout = None if held_windows is None else capture_first_inputs(
                model, decoder[0], held_windows, config.batch_size, storage, device)
        result = PruneResult([], {}, allocation=sparsities)
        bar = tqdm(range(chosen[-1] + 1), desc="layers", unit="layer", disable=not (progress and distributed.is_main()))
        for index in bar:
            layer = decoder[index]
            home = next(layer.parameters()).device
            layer.to(device)
            if index in chosen:
                lmap = adapter.layer_map(model, index)
                if sparsities and config.allocation_unit == "layer":
                    pruner.config = replace(config, pattern=Unstructured(sparsities[index], config.pattern.scope))
                elif sparsities:
                    pruner.patterns = {lin.name: Unstructured(sparsities[lin.name], config.pattern.scope)
                                       for lin in lmap.linears}
                if index in done:
                    outcome = _restore(lmap, checkpoints.load(index), config)
                else:
                    outcome = pruner.prune(index, layer, lmap, inputs, heldout)
                    if not distributed.check_identical([p.data for p in layer.parameters()]):
                        warnings.warn(f"layer {index}: the ranks' pruned weights differed; continuing with rank 0's",
                                      stacklevel=2)
                    if checkpoints is not None:
                        distributed.on_main(lambda: checkpoints.save(
                            index, {lin.name: lin.weight for lin in lmap.linears}, outcome.masks,
                            outcome.record.to_dict(), outcome.grids))
                    result.solve_seconds += outcome.record.solve_seconds
                result.layers.append(outcome.record)
                result.masks.update(outcome.masks)
                result.grids.update(outcome.grids)
                if outcome.record.ffn is not None:
                    bar.set_postfix(ffn_error=f"{outcome.record.ffn.relative_error:.4f}")
            if index < chosen[-1]:
                with pruner.forward_pass():
                    for batches in (inputs,) if heldout is None else (inputs, heldout):
                        batches.hidden = [run_layer(layer, h, kw, model_dtype).to(storage)
                                          for h, kw in zip(batches.hidden, batches.kwargs)]
            layer.to(home)
            release_free_memory()
    result.seconds, result.forward_seconds = time.perf_counter() - started, pruner.forward_seconds
    result.resumed_layers = sorted(done & set(chosen))
    return result


#: seed of the choice of held-out windows (``SparseLLMConfig.heldout_fraction``)
HELDOUT_SEED = 0


def _split_heldout(windows: torch.Tensor, config: PruneConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The windows to fit and, under sparsellm with ``heldout_fraction`` f > 0, the held-out ones:
    ``max(1, round(f n))`` of all ranks' ``n`` windows, chosen with ``HELDOUT_SEED`` by their index in
    rank order (so any split over ranks holds out the same windows)."""
    if config.method != "sparsellm" or config.coordinator(True).heldout_fraction == 0:
        return windows, None
    counts = distributed.gather(windows.shape[0])
    total, offset = sum(counts), sum(counts[: distributed.rank() if distributed.sharded() else 0])
    count = config.coordinator(True).heldout_windows(total)
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(HELDOUT_SEED))[:count]
    held = torch.zeros(total, dtype=torch.bool)
    held[chosen] = True
    mine = held[offset : offset + windows.shape[0]]
    return windows[~mine], windows[mine]


def _allocate(model: nn.Module, adapter: Any, chosen: list[int], calibration: torch.Tensor, config: PruneConfig,
              storage: torch.dtype, dtype: torch.dtype, device: torch.device, pruner: _LayerPruner) -> dict[int | str, float]:
    """Each chosen layer's (or linear's, by ``config.allocation_unit``) sparsity under ``config.allocation``
    (``lm/allocation.py``); empty for uniform."""
    if config.allocation == "uniform":
        return {}
    target = config.pattern.fraction
    with pruner.forward_pass():
        weights = output_fisher(model, adapter, chosen, calibration, FISHER_BATCH) if config.allocation == "fisher" else None
        if weights is not None and config.allocation_ffn_scale != 1:
            ffn = {lin.name for i in chosen for lin in getattr(adapter.layer_map(model, i).ffn, "linears", [])}
            weights = {name: f * config.allocation_ffn_scale if name in ffn else f for name, f in weights.items()}
        inputs = capture_first_inputs(model, adapter.layers(model)[0], calibration, config.batch_size, storage, device)
        stats = layer_statistics(model, adapter, chosen, inputs, dtype, device, sparsity_grid(target, config.allocation_range),
                                 config.solver_options.get("damp", 0.01), weights, config.allocation_unit)
    return allocate(config.allocation, target, stats, config.allocation_range)


def _restore(lmap: DecoderLayerMap, saved: dict[str, Any], config: PruneConfig) -> _LayerOutcome:
    """Write a checkpoint's weights into the layer; its record, masks and grids."""
    for lin in lmap.linears:
        lin.assign(saved["weights"][lin.name].to(lin.weight.device))
    quantizer = config.quantizer
    grids = {name: QuantizationGrid(quantizer.bits, quantizer.groupsize, g["scale"], g["zero"])
             for name, g in saved.get("grids", {}).items()} if quantizer is not None else {}
    record = LayerRecord.from_dict(saved["record"])
    return _LayerOutcome(record, {k: v.bool() for k, v in saved["masks"].items()}, grids, record.linears)
