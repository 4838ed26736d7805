"""What a pruning run is asked to do: ``SparseLLMConfig`` and ``PruneConfig``, validated once.

Both are frozen dataclasses; every field carries its help text (``field.metadata["help"]``), from which
the command line builds its flags, and a default with its reason. Construction validates every field
and raises a one-line ``ValueError`` naming the field and what to do, so a config that exists is a
config that can run. ``to_dict`` gives the JSON form written into reports and checkpoint manifests.

This module imports no torch at import time (the command line's ``--help`` reads it); the checks that
need torch import it when a config is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparsesolve.core.patterns import Pattern
    from sparsesolve.core.quantize import GroupQuantizer

__all__ = ["ALLOCATIONS", "ALLOCATION_UNITS", "CG_TOL", "COORDINATED_FFN_SCALE", "DEFAULT_CHUNK", "LOCAL_NEWTON_STEPS",
           "MASK_SCOPES", "METHODS", "PREACTIVATIONS", "REFINEMENTS",
           "SOLVER_NAMES", "STORAGE_DTYPES", "UPDATE_BLOCK", "UPDATE_BLOCK_DEVICE",
           "PruneConfig", "SparseLLMConfig", "default_ffn_scale", "option"]

#: the per-layer solvers, one file each in ``core/solvers`` exporting a function of the same name.
SOLVER_NAMES = ("magnitude", "wanda", "sparsegpt", "admm")
#: every pruning method: the SparseLLM coordinator, or a per-layer solver applied layer by layer.
METHODS = ("sparsellm", *SOLVER_NAMES)
#: fixed-mask refits inside the coordinator (``SparseLLMConfig.refine``).
REFINEMENTS = ("cg", "exact", "none")
#: storage of the SparseLLM coordinator's auxiliaries when activations are stored in float32
AUX_DTYPES = ("inherit", "bfloat16")
#: what the SparseLLM coordinator does with the dense pre-activations during its one-shot start
#: (``SparseLLMConfig.preactivations``)
PREACTIVATIONS = ("auto", "keep", "recompute")
#: relative residual at which a conjugate-gradient refit stops: on SmolLM2's layer 1 (up and down, 50 % to
#: 90 % and 2:4) it leaves a relative objective gap of at most 2.2e-5 to the exact refit after 8-21
#: iterations (tests/test_cg_refit.py asserts 1e-4).
CG_TOL = 3e-4
#: safeguarded Newton steps of the local proximal update; one suffices because the coordinator repeats
#: the update every iteration (benchmarks/README.md).
LOCAL_NEWTON_STEPS = 1
#: layer-wise sparsity allocations of an unstructured target (``lm/allocation.py``).
ALLOCATIONS = ("uniform", "owl", "obs", "fisher")
#: what a layer-wise allocation gives a sparsity of its own: each decoder layer, or each linear of every layer
ALLOCATION_UNITS = ("layer", "linear")
#: the factor on the fisher allocation's FFN curves under sparsellm: its coordinator takes each FFN's
#: squared output error to about this share of its one-shot start (SmolLM2's uniform P1 runs, summed over
#: the layers: 0.64 at 70 %, 0.55 at 80 %, 0.68 at 2:4), so the FFN costs the loss that much less than the
#: one-shot curves say
COORDINATED_FFN_SCALE = 0.6
#: where an unstructured sparsity is counted: in every row, or over the whole layer (``patterns.Unstructured``).
MASK_SCOPES = ("row", "layer")
#: tokens per chunk for per-token work: bounds the float32 copies to ``8192 x width``.
DEFAULT_CHUNK = 8192
#: values per array in one chunk of sparsellm's elementwise auxiliary updates
#: (``CoordinatorState.update_chunk``): their ~12 per-chunk temporaries (``lm.memory``) then take 12 x 16 MiB
#: on the CPU and 12 x 64 MiB on a GPU (float32) instead of 12 arrays of ``chunk_size x d_ff``, which at the default
#: 8,192 tokens are as large as one whole auxiliary of 65,536 tokens (SmolLM2: 48 MiB each; a 7B FFN:
#: 344 MiB each). Those updates cost the same in smaller chunks: their products keep thousands of rows.
UPDATE_BLOCK = 2**22
UPDATE_BLOCK_DEVICE = 2**24
#: dtypes activations may be stored in (solves are float32 or float64 regardless).
STORAGE_DTYPES = ("float32", "bfloat16", "float16", "float64")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its default and help text (``metadata["help"]``); extra ``metadata``
    (``choices``, ``flag``) shapes its command-line flag."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return field(default=default, metadata={"help": help, **metadata})


def default_ffn_scale(method: str, allocation: str) -> float:
    """``PruneConfig.allocation_ffn_scale`` when not given: ``COORDINATED_FFN_SCALE`` for sparsellm under the
    fisher allocation (its coordinator repairs the FFN), else 1 (the one-shot curves as they are)."""
    return COORDINATED_FFN_SCALE if method == "sparsellm" and allocation == "fisher" else 1.0


def _fail(name: str, message: str) -> None:
    raise ValueError(f"{name}: {message}")


@dataclass(frozen=True)
class SparseLLMConfig:
    """Settings of the SparseLLM coordinator (``coordinator.sparsellm``; the maths in its module docstring).

    ``SparseLLMConfig()`` holds the defaults for chains (the paper's four iterations, equal penalties);
    ``SparseLLMConfig.for_language_models()`` the defaults measured on language models.
    """

    iterations: int = option(4, "coordinator iterations after the one-shot start (the official code uses 4)")
    alpha: float = option(1.0, "penalty holding pre-activations to the linear maps' outputs (only ratios to gamma matter)")
    beta: float = option(1.0, "penalty on the fit of the chain's output")
    gamma: float = option(1.0, "penalty holding activations to the activation of the pre-activations")
    reselect_mask: bool = option(True, "re-choose masks in every pass (else keep the one-shot masks and only refit)")
    refine: str = option("cg", "refit on the chosen mask: cg (conjugate gradients, matmul-shaped), exact (per-row "
                               "Cholesky, small layers) or none", choices=REFINEMENTS)
    refine_tol: float = option(CG_TOL, "relative residual at which a conjugate-gradient refit stops")
    refine_iter: int | None = option(None, "cap on conjugate-gradient iterations; default min(4, tokens // inputs): "
                                           "a refit never costs more than one pass of the linear over the tokens")
    prox: str = option("global", "elementwise pre-activation update: global (bracketed search) or local (Newton "
                                 "steps from the current value, never worse, several times cheaper)",
                       choices=("global", "local"))
    prox_steps: int = option(LOCAL_NEWTON_STEPS, "Newton steps of the local proximal update")
    trace: bool = option(True, "record the penalised objective around every block update (a pass over the tokens each)")
    heldout_fraction: float = option(0.0, "share of the calibration windows kept out of every fit; the candidates "
                                          "(one-shot start, each iteration) are then chosen by their error on them")
    trust: float = option(0.0, "trust region around the one-shot weights W0: each coordinated solve also pays "
                               "trust * ||(W - W0) X||^2 (0: none)")
    ridge: float | None = option(None, "centre each coordinated solve's damping on the one-shot weights W0 and add "
                                       "this to it: the solve pays (damp + ridge) mean(diag H) ||W - W0||^2 instead of "
                                       "damp mean(diag H) ||W||^2 (None: toward zero)")
    ridge_below: float | None = option(None, "apply the ridge only to layers whose target sparsity is below this "
                                             "(None: at every sparsity)")
    aux_dtype: str = option("inherit", "dtype of the stored auxiliaries (pre-activations, activations) when "
                                       "activations are stored in float32: inherit (float32) or bfloat16 (half "
                                       "their memory; every solve and product stays float32)", choices=AUX_DTYPES)
    preactivations: str = option("auto", "the FFN's dense pre-activations during the one-shot start: keep them from "
                                         "the dense forward, or recompute them after it (one more forward of gate and "
                                         "up; two tokens x d_ff arrays less at the start's peak for a gated FFN); auto: "
                                         "recompute off the CPU, where memory is short and that forward cheap. The "
                                         "weights are the same either way", choices=PREACTIVATIONS)

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {self.iterations!r}")
        for name in ("alpha", "beta", "gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sparsellm needs positive penalties alpha, beta, gamma; got {name} = {getattr(self, name)!r}")
        if not self.refine_tol > 0:
            raise ValueError(f"refine_tol must be > 0, got {self.refine_tol!r}")
        if self.refine not in REFINEMENTS:
            raise ValueError(f"refine must be one of {', '.join(REFINEMENTS)}, got {self.refine!r}")
        if self.prox not in ("global", "local"):
            raise ValueError(f"prox must be 'global' or 'local', got {self.prox!r}")
        if self.prox_steps < 1:
            raise ValueError(f"prox_steps must be at least 1, got {self.prox_steps}")
        if self.refine_iter is not None and self.refine_iter < 0:
            raise ValueError(f"refine_iter must be >= 0 or None, got {self.refine_iter}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction!r}")
        if not self.trust >= 0:
            raise ValueError(f"trust must be >= 0, got {self.trust!r}")
        if self.ridge is not None and not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0 or None, got {self.ridge!r}")
        if self.ridge_below is not None and not 0 < self.ridge_below <= 1:
            raise ValueError(f"ridge_below must be in (0, 1] or None, got {self.ridge_below!r}")
        if self.aux_dtype not in AUX_DTYPES:
            raise ValueError(f"aux_dtype must be one of {', '.join(AUX_DTYPES)}, got {self.aux_dtype!r}")
        if self.preactivations not in PREACTIVATIONS:
            raise ValueError(f"preactivations must be one of {', '.join(PREACTIVATIONS)}, got {self.preactivations!r}")
        if not self.reselect_mask and self.refine == "none":
            raise ValueError("reselect_mask=False keeps the masks and only refits: choose refine 'cg' or 'exact'")

    @classmethod
    def for_language_models(cls, **overrides: Any) -> SparseLLMConfig:
        """The defaults for a decoder layer's FFN, measured on SmolLM2 (README, "sparsellm defaults"):

        - one iteration: the first gives 95 % of four iterations' error reduction at 70 %, and each
          further one costs more than sparsegpt's whole layer;
        - ``alpha = 0.1``: pre-activations held less tightly than activations give a lower FFN error
          than ``alpha = gamma`` on every layer and pattern measured;
        - the local proximal update: the global search's error at a third of its cost;
        - no objective trace: each evaluation is a pass over the tokens;
        - ``ridge = 0.1``: the coordinated solves' damping centred on the one-shot weights, 0.1 stronger;
          with 16 x 256 wiki tokens it turns +53 % / +64 % over sparsegpt on PTB / code (corpora in no
          calibration set) into -24 % / -24 %, and lowers wiki further (README, "Quality beyond the
          anchors");
        - ``ridge_below = 0.75``: only below 75 % sparsity. P1 with every layer pruned: at 2:4 and 4:8 the
          ridge lowers code perplexity by 35 % and 8 % (PTB by 13 % and 21 %), at 70 % PTB by 7 %; at
          3:4 and 90 % it raises code by 16 % and 23 %: where the one-shot solution is far from the dense
          layer, pulling toward it costs more than the over-fitting it prevents;
        - ``aux_dtype = "bfloat16"``: the auxiliaries of a float32 model in bfloat16, the two
          pre-activations and the activation (``N x d_ff`` each, the coordinator's memory beyond
          sparsegpt's) at half the memory; the FFN's output error moved by 0.06 % or less on SmolLM2's
          layer 1 and synthetic FFNs up to 2048 x 5632 at 2:4 and 70 % (README, "SparseLLM at scale").
        """
        return cls.with_options(cls(iterations=1, alpha=0.1, prox="local", trace=False, ridge=0.1, ridge_below=0.75,
                                    aux_dtype="bfloat16"), overrides)

    def aux_storage(self, storage: str) -> str:
        """The dtype (name) the auxiliaries are stored in when the activations are stored in ``storage``
        (a name: ``"float32"``, ``"bfloat16"``, ...): ``aux_dtype`` for float32 activations, else theirs."""
        return "bfloat16" if self.aux_dtype == "bfloat16" and storage == "float32" else storage

    def ridge_at(self, sparsity: float) -> float | None:
        """The ridge in force for a layer pruned to ``sparsity`` (``ridge``, or None at or above
        ``ridge_below``)."""
        return self.ridge if self.ridge_below is None or sparsity < self.ridge_below else None

    @classmethod
    def with_options(cls, base: SparseLLMConfig, overrides: Mapping[str, Any]) -> SparseLLMConfig:
        """``base`` with some fields replaced; an unknown name is a one-line error listing the known ones."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown sparsellm option {unknown[0]!r}; known: {', '.join(f.name for f in dataclasses.fields(cls))}")
        return dataclasses.replace(base, **overrides)

    def heldout_windows(self, windows: int) -> int:
        """How many of ``windows`` calibration windows ``heldout_fraction`` holds out: 0 when it is 0, else
        ``max(1, round(fraction * windows))``; a one-line error when that leaves none to fit."""
        if self.heldout_fraction == 0:
            return 0
        count = max(1, round(self.heldout_fraction * windows))
        if count >= windows:
            raise ValueError(f"heldout_fraction {self.heldout_fraction} of {windows} calibration windows leaves none "
                             "to fit; use more windows (--nsamples) or a smaller fraction")
        return count

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (reports, checkpoint manifests)."""
        return dataclasses.asdict(self)


def _solver_keywords(name: str) -> set[str]:
    import inspect

    from sparsesolve.core.solvers import get_solver

    parameters = inspect.signature(get_solver(name)).parameters
    return {p for p, spec in parameters.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY} - {"problem", "target"}


@dataclass(frozen=True)
class PruneConfig:
    """How to prune: method, pattern, the per-layer solver and its options, and where the work runs.

    ``pattern`` accepts anything ``parse_pattern`` does (``0.7``, ``"70%"``, ``"2:4"``, a ``Pattern``) and
    holds the parsed ``Pattern``. ``sparsellm`` applies to ``method="sparsellm"`` only; None means the
    defaults of what is pruned (``SparseLLMConfig.for_language_models()`` for a language model,
    ``SparseLLMConfig()`` for a chain). ``solver_options`` are keyword arguments of the per-layer
    solver (checked against its signature); ``quantizer`` (``GroupQuantizer``) needs sparsegpt, whose
    OBS pass compensates the rounding.
    """

    pattern: Pattern | str | float = option(None, "unstructured fraction (0.7, '70%') or N:M pattern ('2:4')")
    method: str = option("sparsellm", "sparsellm, or a per-layer solver applied layer by layer", choices=METHODS)
    solver: str = option("sparsegpt", "per-layer solver inside sparsellm and for attention", choices=SOLVER_NAMES)
    solver_options: Mapping[str, Any] = option((), "keyword arguments of the per-layer solver, e.g. {'damp': 0.01}")
    quantizer: GroupQuantizer | None = option(None, "also quantise kept weights (sparsegpt's joint pass)")
    sparsellm: SparseLLMConfig | None = option(None, "coordinator settings (None: the defaults of what is pruned)")
    layers: str | Sequence[int] | None = option(None, "decoder layers to prune: 'all' (None), 'first-half', 'A:B' "
                                                      "(0-based, B excluded) or 'i,j'")
    batch_size: int = option(8, "calibration windows per forward pass", flag="--calib-batch-size")
    storage_dtype: str | None = option(None, "dtype of stored activations; solves stay float32 or float64",
                                       choices=STORAGE_DTYPES)
    device: str | None = option(None, "where layers are processed (None: the model's device)")
    chunk_size: int | None = option(DEFAULT_CHUNK, "tokens per chunk of per-token work (None: all at once)")
    allocation: str = option("uniform", "sparsity per decoder layer of an unstructured target, the average kept: "
                                        "uniform, owl (outlier-weighted), obs (error curves) or fisher (the "
                                        "curves weighed by the loss's output Fisher)", choices=ALLOCATIONS)
    mask_scope: str = option("row", "where an unstructured sparsity is counted: 'row' (every row exactly) or "
                                    "'layer' (rows may differ, as the original SparseGPT selects)", choices=MASK_SCOPES)
    true_sequential: bool = option(True, "inside a decoder layer, prune each linear on the outputs of the linears "
                                         "pruned before it (else all of them on the dense layer's pass, as the "
                                         "original SparseGPT and Wanda code do)")
    allocation_range: float = option(0.08, "how far the layers' sparsities move: owl spans twice this (OWL's "
                                           "lambda, 0.08 for LLaMA), obs and fisher keep each layer within this of "
                                           "the target")
    allocation_unit: str = option("layer", "what gets a sparsity of its own under an allocation: layer (every linear "
                                           "of a decoder layer alike) or linear (each linear; not for MoE experts)",
                                  choices=ALLOCATION_UNITS)
    allocation_ffn_scale: float | None = option(None, "fisher only: multiplies the error curves of every layer's dense "
                                                      "FFN linears before the zeros are split; below 1 moves zeros from "
                                                      "attention into the FFN, which sparsellm's coordinator repairs "
                                                      "beyond its one-shot start (None: "
                                                      f"{COORDINATED_FFN_SCALE} for sparsellm, 1 for the other methods)")

    def __post_init__(self) -> None:
        from sparsesolve.core.patterns import Pattern, parse_pattern
        from sparsesolve.core.quantize import GroupQuantizer

        if self.pattern is None:
            _fail("pattern", "give a sparsity (e.g. 0.7) or an N:M pattern (e.g. '2:4')")
        if self.mask_scope not in MASK_SCOPES:
            _fail("mask_scope", f"must be one of {', '.join(MASK_SCOPES)}, got {self.mask_scope!r}")
        if not isinstance(self.pattern, Pattern):
            object.__setattr__(self, "pattern", parse_pattern(self.pattern, self.mask_scope))
        elif self.mask_scope == "layer" and hasattr(self.pattern, "scope"):
            object.__setattr__(self, "pattern", dataclasses.replace(self.pattern, scope="layer"))
        elif getattr(self.pattern, "scope", "row") == "layer":
            object.__setattr__(self, "mask_scope", "layer")  # an Unstructured(s, scope="layer") says so itself
        if self.mask_scope == "layer" and not hasattr(self.pattern, "scope"):
            _fail("mask_scope", f"'layer' counts an unstructured sparsity over the layer; pattern {self.pattern} "
                                "fixes every row's (use a fraction such as 0.7)")
        if self.method not in METHODS:
            _fail("method", f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.solver not in SOLVER_NAMES:
            _fail("solver", f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVER_NAMES)}")
        if self.sparsellm is not None and self.method != "sparsellm":
            _fail("sparsellm", f"coordinator settings apply to method 'sparsellm' only, not {self.method!r}")
        if self.sparsellm is not None and not isinstance(self.sparsellm, SparseLLMConfig):
            _fail("sparsellm", f"must be a SparseLLMConfig, got {type(self.sparsellm).__name__}")
        options = dict(self.solver_options)
        known = _solver_keywords(self.method if self.method != "sparsellm" else self.solver)
        unknown = sorted(set(options) - known)
        if unknown:
            _fail("solver_options", f"{unknown[0]!r} is not an option of solver "
                                    f"{self.method if self.method != 'sparsellm' else self.solver}; known: {', '.join(sorted(known))}")
        if "damp" in options and not options["damp"] >= 0:
            _fail("damp", f"must be >= 0, got {options['damp']!r}")
        quantizer = options.pop("quantizer", None) if self.quantizer is None else self.quantizer
        if quantizer is not None:
            if not isinstance(quantizer, GroupQuantizer):
                _fail("quantizer", f"must be a GroupQuantizer, got {type(quantizer).__name__}")
            if self.method != "sparsegpt":
                _fail("quantizer", "joint quantisation needs method 'sparsegpt', whose OBS pass compensates it")
        object.__setattr__(self, "quantizer", quantizer)
        object.__setattr__(self, "solver_options", options)
        if self.storage_dtype is not None:
            name = str(self.storage_dtype).removeprefix("torch.")
            if name not in STORAGE_DTYPES:
                _fail("storage_dtype", f"must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
            object.__setattr__(self, "storage_dtype", name)
        if self.batch_size < 1:
            _fail("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.chunk_size is not None and self.chunk_size < 1:
            _fail("chunk_size", f"must be >= 1 or None, got {self.chunk_size}")
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device))
        if self.allocation not in ALLOCATIONS:
            _fail("allocation", f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation != "uniform" and not hasattr(self.pattern, "fraction"):
            _fail("allocation", f"{self.allocation!r} spreads an unstructured sparsity over the layers; "
                                f"pattern {self.pattern} fixes every layer's (use a fraction such as 0.7)")
        if self.allocation_unit not in ALLOCATION_UNITS:
            _fail("allocation_unit", f"must be one of {', '.join(ALLOCATION_UNITS)}, got {self.allocation_unit!r}")
        if self.allocation_unit != "layer" and self.allocation == "uniform":
            _fail("allocation_unit", f"{self.allocation_unit!r} splits an allocation's zeros; uniform gives every linear "
                                     "the target already (choose --allocation owl, obs or fisher)")
        if not 0 < self.allocation_range <= 0.5:
            _fail("allocation_range", f"must be in (0, 0.5], got {self.allocation_range!r}")
        if self.allocation_ffn_scale is None:
            object.__setattr__(self, "allocation_ffn_scale", default_ffn_scale(self.method, self.allocation))
        if not 0 < self.allocation_ffn_scale < float("inf"):
            _fail("allocation_ffn_scale", f"must be a finite number > 0, got {self.allocation_ffn_scale!r}")
        if self.allocation_ffn_scale != 1 and self.allocation != "fisher":
            _fail("allocation_ffn_scale", f"scales the fisher allocation's FFN curves; allocation {self.allocation!r} "
                                          "has none (use --allocation fisher, or leave the scale at 1)")

    def coordinator(self, language_model: bool) -> SparseLLMConfig:
        """The coordinator settings in force (``sparsellm``, or the defaults of what is pruned)."""
        if self.sparsellm is not None:
            return self.sparsellm
        return SparseLLMConfig.for_language_models() if language_model else SparseLLMConfig()

    def solve_options(self) -> dict[str, Any]:
        """Keyword arguments of every per-layer solve (``solver_options`` plus the quantizer)."""
        return {**self.solver_options, **({"quantizer": self.quantizer} if self.quantizer is not None else {})}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (reports, checkpoint manifests)."""
        quantization = None if self.quantizer is None else {"bits": self.quantizer.bits, "groupsize": self.quantizer.groupsize}
        return {"method": self.method, "pattern": str(self.pattern), "solver": self.solver,
                "solver_options": dict(sorted(self.solver_options.items())), "quantization": quantization,
                "sparsellm": None if self.sparsellm is None else self.sparsellm.to_dict(),
                "layers": self.layers if self.layers is None or isinstance(self.layers, str) else list(self.layers),
                "batch_size": self.batch_size, "storage_dtype": self.storage_dtype, "device": self.device,
                "chunk_size": self.chunk_size, "allocation": self.allocation, "mask_scope": self.mask_scope,
                "true_sequential": self.true_sequential,
                "allocation_range": self.allocation_range, "allocation_unit": self.allocation_unit,
                "allocation_ffn_scale": self.allocation_ffn_scale}
