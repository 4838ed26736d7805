"""Perplexity vs sparsity for every method and pattern (protocol P1 of ../shared/BENCHMARKS.md).

    python -m benchmarks.ppl_vs_sparsity                          # the whole P1 grid, full-model scope
    python -m benchmarks.ppl_vs_sparsity --scope first-half       # the SparseLLM paper's setting
    python -m benchmarks.ppl_vs_sparsity --methods sparsegpt --patterns 0.7,2:4
    OMP_NUM_THREADS=1 python -m benchmarks.ppl_vs_sparsity --jobs 2     # two runs at a time, one thread each
    python -m benchmarks.ppl_vs_sparsity --profile paper          # P2 (128 x 2048, full test split): a GPU
    python -m benchmarks.ppl_vs_sparsity --methods sparsellm --patterns 0.7 --sparsellm-options alpha=1 --tag alpha1

One JSON per run in ``benchmarks/results/ppl/`` (``PROFILE_SCOPE_METHOD_PATTERN.json``); runs whose JSON
exists are skipped, so an interrupted grid continues where it stopped. ``--sparsellm-options`` overrides
the language-model defaults for a study; such runs need a ``--tag`` (appended to the file stem) and
stay out of the main table. Each run executes in its own
process (``--one``), so its peak resident memory is its own and a crash does not end the grid. The
dense perplexities are measured once per profile (``PROFILE_dense.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmarks.common import RESULTS, metadata, parse_options, write_json
from sparsesolve.core.config import COORDINATED_FFN_SCALE, PruneConfig, default_ffn_scale

PPL = RESULTS / "ppl"
METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "sparsellm")
PATTERNS = ("0.5", "0.6", "0.7", "0.8", "0.9", "2:4", "4:8", "3:4")
#: ``PruneConfig.allocation_range``'s default: runs with another range get a ``_rangeR`` suffix
DEFAULT_RANGE = next(f.default for f in fields(PruneConfig) if f.name == "allocation_range")


@dataclass(frozen=True)
class Profile:
    """Calibration and evaluation sizes of a protocol."""

    nsamples: int
    seq_len: int
    eval_windows: int | None
    corpora: tuple[str, ...] = ("wiki", "ptb", "code")
    calib: str = "wiki"
    eval_seq_len: int | None = None     # test windows of another length than the calibration's

    @property
    def test_seq_len(self) -> int:
        """Tokens per test window."""
        return self.eval_seq_len or self.seq_len


PROFILES = {
    "p1": Profile(64, 512, 64),
    "paper": Profile(128, 2048, None),
    "smoke": Profile(8, 128, 2),
    # few calibration tokens (16 x 256), scored like P1 (64 test windows of 512)
    "small": Profile(16, 256, 64, eval_seq_len=512),
}


def run_name(profile: str, scope: str, method: str, pattern: str, tag: str = "", allocation: str = "uniform",
             mask_scope: str = "row", true_sequential: bool = True, solver: str = "sparsegpt", calib: str = "",
             allocation_range: float | None = None, allocation_unit: str = "layer", allocation_ffn_scale: float | None = None) -> str:
    """File stem of one run, e.g. ``p1_full_sparsegpt_2-4``; ``_ALLOCATION`` appended unless uniform
    (``_ALLOCATION-linear`` with a sparsity per linear, ``_ALLOCATION_rangeR`` when ``allocation_range``
    is given and not the default, then ``_ffnF`` when the FFN curves are scaled by ``F``: given, or by default
    ``COORDINATED_FFN_SCALE`` for sparsellm under fisher),
    ``_layermask`` when the sparsity is counted per layer, ``_densepass`` when a layer's linears are all
    fitted on its dense pass, ``_SOLVER`` when sparsellm's inner solver is not sparsegpt,
    ``_calib-A+B`` when the calibration corpora are not the profile's, then ``_TAG`` for a study run
    (``p1_full_sparsellm_0.7_owl``, ``p1_full_sparsegpt_0.9_layermask_densepass``,
    ``small_full_sparsellm_0.7_calib-wiki+ptb``)."""
    stem = f"{profile}_{scope}_{method}_{pattern.replace(':', '-').replace('%', '')}"
    spread = "" if allocation_range in (None, DEFAULT_RANGE) or allocation == "uniform" else f"range{allocation_range:g}"
    label = allocation + ("-linear" if allocation_unit == "linear" else "")
    scale = default_ffn_scale(method, allocation) if allocation_ffn_scale is None else allocation_ffn_scale
    variants = [label if allocation != "uniform" else "", spread, "layermask" if mask_scope == "layer" else "",
                f"ffn{scale:g}" if scale != 1 else "",
                "" if true_sequential else "densepass", solver if method == "sparsellm" and solver != "sparsegpt" else "",
                f"calib-{calib.replace(',', '+')}" if calib else "", tag]
    return "_".join([stem, *(v for v in variants if v)])


def _perplexities(model: Any, tokenizer: Any, profile: Profile) -> dict[str, float]:
    from sparsesolve.lm.data import corpus_tokens
    from sparsesolve.lm.evaluate import perplexity

    return {c: perplexity(model, corpus_tokens(tokenizer, c, "test"), profile.test_seq_len, profile.eval_windows,
                          progress=False)
            for c in profile.corpora}


def dense(model_name: str, profile_name: str, out: Path) -> dict[str, Any]:
    """Dense perplexities of ``model_name`` under a profile (measured once, then read from JSON; a corpus
    added to the profile since is measured and added)."""
    from sparsesolve.lm.models import load_model

    path = out / f"{profile_name}_dense.json"
    record = json.loads(path.read_text()) if path.exists() else {"model": model_name, "perplexity": {}}
    profile = PROFILES[profile_name]
    missing = [c for c in profile.corpora if c not in record["perplexity"]]
    if not missing:
        return record
    model, tokenizer = load_model(model_name)
    measured = _perplexities(model, tokenizer, Profile(profile.nsamples, profile.seq_len, profile.eval_windows,
                                                       tuple(missing), eval_seq_len=profile.eval_seq_len))
    record = {**record, "meta": metadata("benchmarks.ppl_vs_sparsity", 0),
              "perplexity": {**record["perplexity"], **measured}}
    write_json(path.stem, record, out)
    return record


def one(model_name: str, profile_name: str, scope: str, method: str, pattern: str, out: Path,
        overrides: dict[str, Any], tag: str, allocation: str = "uniform", mask_scope: str = "row",
        true_sequential: bool = True, solver: str = "sparsegpt", calib: str = "",
        allocation_range: float | None = None, allocation_unit: str = "layer", allocation_ffn_scale: float | None = None) -> None:
    """Prune, evaluate and record one run (executed in its own process); ``calib`` replaces the profile's
    calibration corpora (comma-separated) when given; ``allocation_range`` the allocation's range (None:
    the default); ``allocation_unit``: a sparsity per layer or per linear; ``allocation_ffn_scale``: the
    factor on the fisher allocation's FFN curves (None: the default)."""
    from sparsesolve.config import CalibrationConfig, EvaluationConfig, RunConfig
    from sparsesolve.core.config import SparseLLMConfig
    from sparsesolve.lm.corpora import code_source
    from sparsesolve.lm.environment import peak_memory_mb
    from sparsesolve.pipeline import run_prune

    profile = replace(PROFILES[profile_name], calib=calib or PROFILES[profile_name].calib)
    meta = metadata("benchmarks.ppl_vs_sparsity", 0)  # the commit and load when the run starts
    coordinator = SparseLLMConfig.for_language_models(**overrides) if method == "sparsellm" else None
    config = PruneConfig(pattern, method=method, sparsellm=coordinator, layers="first-half" if scope == "first-half" else None,
                         allocation=allocation, mask_scope=mask_scope, true_sequential=true_sequential, solver=solver,
                         allocation_range=DEFAULT_RANGE if allocation_range is None else allocation_range,
                         allocation_unit=allocation_unit, allocation_ffn_scale=allocation_ffn_scale)
    run = RunConfig(model_name, config, CalibrationConfig(profile.calib, profile.nsamples, profile.seq_len, seed=0),
                    EvaluationConfig(corpora=(), seq_len=profile.seq_len))  # evaluated below, non-finite recorded
    done = run_prune(run, progress=False)
    model, tokenizer, result = done.model, done.tokenizer, done.prune
    options = None if coordinator is None else coordinator.to_dict()
    prune_seconds = result.seconds
    peak_prune = peak_memory_mb()
    try:
        ppl: dict[str, float] | None = _perplexities(model, tokenizer, profile)
        nonfinite = any(not math.isfinite(v) for v in ppl.values())
    except FloatingPointError:
        ppl, nonfinite = None, True
    layer_sparsity: dict[str, float] = {}
    for record in result.layers:
        masks = [result.masks[name] for name in record.linears]
        layer_sparsity[str(record.layer)] = sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks)
    write_json(run_name(profile_name, scope, method, pattern, tag, allocation, mask_scope, true_sequential, solver, calib,
                        allocation_range, allocation_unit, allocation_ffn_scale), {
        "meta": meta, "model": model_name, "profile": profile_name, "scope": scope, "method": method,
        "pattern": pattern, "calibration": vars(profile) | {"seed": 0},
        "sparsellm_options": options, "tag": tag, "allocation": allocation,
        "allocation_range": config.allocation_range, "allocation_unit": allocation_unit,
        "allocation_ffn_scale": config.allocation_ffn_scale, "mask_scope": mask_scope,
        "true_sequential": true_sequential, "solver": solver if method == "sparsellm" else method,
        "heldout_fraction": (options or {}).get("heldout_fraction", 0.0), "code_corpus": code_source(),
        "perplexity": ppl, "nonfinite": nonfinite, "sparsity": result.sparsity, "layer_sparsity": layer_sparsity,
        **({"linear_sparsity": {str(k): v for k, v in result.allocation.items()}} if allocation_unit == "linear" else {}),
        "escalations": result.escalations,
        "seconds": {"prune": prune_seconds, "forward": result.forward_seconds, "solve": result.solve_seconds},
        "peak_memory_mb": {"prune": peak_prune, "total": peak_memory_mb()},
        "ffn_relative_error": {str(r.layer): r.to_dict()["ffn"] for r in result.layers},
    }, out)


def main() -> None:
    """Run the grid (skipping finished runs), one subprocess per run."""
    from sparsesolve.core.config import ALLOCATION_UNITS, ALLOCATIONS, MASK_SCOPES, SOLVER_NAMES

    parser = argparse.ArgumentParser(description="perplexity vs sparsity grid (resumable)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", choices=list(PROFILES), default="p1")
    parser.add_argument("--scope", choices=["full", "first-half"], default="full")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--out", type=Path, default=PPL, help="results folder (default benchmarks/results/ppl)")
    parser.add_argument("--sparsellm-options", default="", help="study overrides, e.g. alpha=1,iterations=2 (needs --tag)")
    parser.add_argument("--tag", default="", help="suffix of the run files of a study run")
    parser.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                        help="layer-wise sparsity allocation of unstructured patterns (file stem suffix unless uniform)")
    parser.add_argument("--allocation-range", type=float, default=None,
                        help=f"how far the layers' sparsities move (default {DEFAULT_RANGE}; suffix _rangeR otherwise)")
    parser.add_argument("--allocation-unit", default="layer", choices=ALLOCATION_UNITS,
                        help="a sparsity per decoder layer or per linear (suffix -linear on the allocation)")
    parser.add_argument("--allocation-ffn-scale", type=float, default=None,
                        help=f"factor on the fisher allocation's FFN curves (default {COORDINATED_FFN_SCALE} for "
                             "sparsellm, else 1; suffix _ffnF unless 1)")
    parser.add_argument("--mask-scope", default="row", choices=MASK_SCOPES,
                        help="count an unstructured sparsity per row or per layer (file stem suffix _layermask)")
    parser.add_argument("--dense-pass", action="store_true",
                        help="fit every linear of a layer on its dense pass (true_sequential=False; suffix _densepass)")
    parser.add_argument("--solver", default="sparsegpt", choices=SOLVER_NAMES,
                        help="sparsellm's per-layer solver (file stem suffix unless sparsegpt)")
    parser.add_argument("--calib", default="",
                        help="calibration corpora, comma-separated, instead of the profile's (suffix _calib-A+B)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each its own process (set OMP_NUM_THREADS so jobs x threads <= cores)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods, patterns = args.methods.split(","), args.patterns.split(",")
    overrides = parse_options(args.sparsellm_options)
    if overrides and not args.tag:
        parser.error("--sparsellm-options changes the method: give the runs a --tag so they stay out of the main table")
    if args.one:
        one(args.model, args.profile, args.scope, methods[0], patterns[0], args.out, overrides, args.tag, args.allocation,
            args.mask_scope, not args.dense_pass, args.solver, args.calib, args.allocation_range, args.allocation_unit,
            args.allocation_ffn_scale)
        return
    dense(args.model, args.profile, args.out)
    names = {(m, p): run_name(args.profile, args.scope, m, p, args.tag, args.allocation, args.mask_scope, not args.dense_pass,
                              args.solver, args.calib, args.allocation_range, args.allocation_unit, args.allocation_ffn_scale)
             for m in methods for p in patterns}
    todo = [key for key, name in names.items() if not (args.out / f"{name}.json").exists()]
    print(f"{len(methods) * len(patterns) - len(todo)} runs done, {len(todo)} to go", flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool, tqdm(total=len(todo), desc="runs", unit="run") as bar:
        futures = [pool.submit(_run, args, method, pattern) for method, pattern in todo]
        for future in as_completed(futures):
            if future.result():
                tqdm.write(future.result())
            bar.update()


def _run(args: argparse.Namespace, method: str, pattern: str) -> str:
    """One run in its own process; an error line if it failed, else ``""``."""
    command = [sys.executable, "-m", "benchmarks.ppl_vs_sparsity", "--one", "--model", args.model, "--profile",
               args.profile, "--scope", args.scope, "--methods", method, "--patterns", pattern, "--out", str(args.out),
               "--sparsellm-options", args.sparsellm_options, "--tag", args.tag, "--allocation", args.allocation,
               "--mask-scope", args.mask_scope, *(["--dense-pass"] if args.dense_pass else []), "--solver", args.solver,
               "--calib", args.calib, "--allocation-unit", args.allocation_unit,
               *([] if args.allocation_ffn_scale is None else ["--allocation-ffn-scale", str(args.allocation_ffn_scale)]),
               *([] if args.allocation_range is None else ["--allocation-range", str(args.allocation_range)])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == 0:
        return ""
    return f"{method} {pattern} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"

if __name__ == "__main__":
    main()
