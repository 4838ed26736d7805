"""The one pipeline every front door calls: load -> calibrate -> evaluate dense -> prune -> evaluate -> save.

``run_prune(RunConfig)`` is what ``sparsesolve prune``, the benchmarks and the notebooks run;
``evaluate_model`` the perplexity step on its own (``sparsesolve eval``); ``run_retrain`` the AST
retraining run (``sparsesolve retrain``: teacher and student loaded, wrapped, trained, saved).

Order of ``run_prune``, chosen so that bad input fails before any expensive work: the output folder
is checked (exists? writable?) before the model loads, the model and pattern are checked before the
corpora are tokenised, and the dense perplexity is saved in the staging folder so ``resume`` does not
evaluate it twice.

Under ``torchrun --nproc-per-node K`` (or an initialised process group) ``run_prune`` runs token
sharded (``core.distributed``): the ranks check they were given the same run, each takes its
contiguous share of the calibration windows (and of the test windows when scoring), the token sums
are all-reduced, and rank 0 alone prints and writes the staging folder, checkpoints and output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparsesolve.config import EvaluationConfig, RunConfig
from sparsesolve.core import distributed
from sparsesolve.lm.bundled import BUNDLED
from sparsesolve.lm.data import corpus_tokens, mixed_calibration_windows
from sparsesolve.lm.decoder import PruneResult, check_prunable, prune_decoder
from sparsesolve.lm.environment import environment, peak_memory_mb, stage_peak
from sparsesolve.lm.evaluate import perplexity
from sparsesolve.lm.models import check_seq_len, load_model
from sparsesolve.lm.output import OutputFolder
from sparsesolve.retrain.config import RetrainConfig

__all__ = ["RunResult", "evaluate_model", "run_prune", "run_retrain"]


def _silent(message: str) -> None:
    del message


@dataclass
class RunResult:
    """What ``run_prune`` did: the pruned ``model`` and its ``tokenizer``, the ``prune`` result, the
    dense and pruned perplexities, the ``report`` (as saved), the output ``path`` (None without ``out``)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    prune: PruneResult
    dense: dict[str, float]
    pruned: dict[str, float]
    report: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def evaluate_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, evaluation: EvaluationConfig, *,
                   tokens: dict[str, torch.Tensor] | None = None, progress: bool = True) -> dict[str, float]:
    """Perplexity per corpus of ``evaluation.corpora`` (test split; ``tokens`` if already tokenised)."""
    tokens = tokens or {name: corpus_tokens(tokenizer, name, "test") for name in evaluation.corpora}
    return {name: perplexity(model, ids, evaluation.seq_len, evaluation.windows or None, batch_size=evaluation.batch_size,
                             progress=progress) for name, ids in tokens.items()}


def run_prune(run: RunConfig, *, progress: bool = True, command: str | None = None,
              say: Callable[[str], None] = _silent) -> RunResult:
    """Execute ``run`` (module docstring); ``say`` receives one line per stage; ``command`` goes into the report.
    Under ``torchrun`` the process group starts here (gloo for ``--device cpu``, nccl for cuda) and ends
    with the run."""
    import torch.distributed as dist

    device, own_group = distributed.start_process_group(run.prune.device or "cpu")
    try:
        with distributed.token_sharded():
            distributed.agree({**run.to_dict(), "out": run.out, "resume": run.resume, "overwrite": run.overwrite,
                               "prune": {**run.prune.to_dict(), "device": None}}, "the run's settings")
            if own_group and device != (run.prune.device or "cpu"):
                run = replace(run, prune=replace(run.prune, device=device))
            return _prune(run, progress=progress, command=command, say=say if distributed.is_main() else _silent)
    finally:
        if own_group:
            dist.destroy_process_group()


def _prune(run: RunConfig, *, progress: bool, command: str | None, say: Callable[[str], None]) -> RunResult:
    out = None if run.out is None else OutputFolder(run.out, overwrite=run.overwrite, resume=run.resume)
    if out is not None:
        distributed.on_main(out.check)
    started = time.perf_counter()
    model, tokenizer = load_model(run.model)
    check_seq_len(model, run.calibration.seq_len)
    layers = check_prunable(model, run.prune.pattern, run.prune.layers, run.prune.allocation_unit)
    calib, ranks = run.calibration, distributed.world_size() if distributed.sharded() else 1
    if calib.windows < ranks:
        raise ValueError(f"{calib.windows} calibration windows cannot be shared by {ranks} ranks; "
                         f"use --nsamples {ranks} or more, or fewer ranks")
    windows = mixed_calibration_windows([corpus_tokens(tokenizer, name, "train") for name in calib.corpus.split(",")],
                                        calib.windows, calib.seq_len, calib.seed)
    windows = windows[distributed.share(len(windows), ranks)]
    tests = {name: corpus_tokens(tokenizer, name, "test") for name in run.evaluation.corpora}
    resumed = distributed.on_main(out.begin) if out is not None else False
    say(f"{'resuming' if resumed else 'pruning'} {run.model} ({model.config.model_type}, {_count(len(layers), 'layer')}) "
        f"with {run.prune.method} at {run.prune.pattern}; calibration {calib.windows} x {calib.seq_len} tokens of {calib.corpus}"
        + (f", sharded over {ranks} ranks" if ranks > 1 else ""))
    tick = time.perf_counter()
    dense = distributed.on_main(lambda: out.read_json("dense.json")) if resumed else None
    if dense is None:
        dense = evaluate_model(model, tokenizer, run.evaluation, tokens=tests, progress=progress)
        if out is not None:
            distributed.on_main(lambda: out.write_json("dense.json", dense))
    eval_seconds = time.perf_counter() - tick
    lifetime_peak = peak_memory_mb()
    with stage_peak() as memory:
        result = prune_decoder(model, windows, run.prune, checkpoint_dir=None if out is None else out.checkpoints,
                               resume=resumed, progress=progress)
    tick = time.perf_counter()
    pruned = evaluate_model(model, tokenizer, run.evaluation, tokens=tests, progress=progress)
    eval_seconds += time.perf_counter() - tick
    report = {
        "command": command, **run.to_dict(),
        "model_note": BUNDLED[run.model].description if run.model in BUNDLED else None,
        "method": run.prune.method, "pattern": str(run.prune.pattern), "solver": run.prune.solver, "layers": layers,
        "quantization": run.prune.to_dict()["quantization"],
        "perplexity": {"dense": dense, "pruned": pruned},
        "sparsity": result.sparsity, "escalations": result.escalations, "resumed_layers": result.resumed_layers,
        "allocation": {"kind": run.prune.allocation, "unit": run.prune.allocation_unit,
                       "ffn_scale": run.prune.allocation_ffn_scale,
                       f"{run.prune.allocation_unit}_sparsity": {str(k): v for k, v in result.allocation.items()}},
        "seconds": {"total": time.perf_counter() - started, "prune": result.seconds,
                    "forward": result.forward_seconds, "solve": result.solve_seconds, "evaluation": eval_seconds},
        "ranks": ranks, "peak_memory_mb": max(per_rank := distributed.gather(max(lifetime_peak, peak_memory_mb()))),
        "peak_memory_mb_per_rank": per_rank,
        "prune_memory_mb_per_rank": distributed.gather({"before": memory.before_mb, "peak": memory.peak_mb}),
        **environment(),
        "layers_detail": [record.to_dict() for record in result.layers],
    }
    path = None if out is None else distributed.on_main(lambda: out.commit(model, tokenizer, result.masks, report,
                                                                           result.grids))
    say(f"sparsity {result.sparsity:.4f} over the pruned linears; pruning {result.seconds:.1f} s "
        f"(forward {result.forward_seconds:.1f} s, solves {result.solve_seconds:.1f} s); peak memory "
        f"{report['peak_memory_mb']:.0f} MiB" + (" per rank" if ranks > 1 else ""))
    for name in tests:
        say(f"perplexity {name}: dense {dense[name]:.2f} -> pruned {pruned[name]:.2f}")
    if path is not None:
        say(f"saved {path} ({_folder_mb(path):.0f} MB: weights, masks.safetensors, report.json)")
    return RunResult(model, tokenizer, result, dense, pruned, report, path)


def run_retrain(config: RetrainConfig, *, teacher: str, out: str, from_dir: str | None = None, pruned: str = "zero",
                slorb: int = 0, slorb_trainable_projection: bool = False, device: str = "cpu", overwrite: bool = False,
                resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """AST retraining: the student from ``from_dir`` (a 2:4 prune output) or the teacher's dense weights
    with magnitude masks, trained towards ``teacher`` and saved to ``out``. Under ``torchrun`` (``WORLD_SIZE``
    > 1) the process group starts here (gloo on CPU, nccl on CUDA) and rank 0 writes ``out``."""
    import torch.distributed as dist

    from sparsesolve.retrain.loop import retrain
    from sparsesolve.retrain.start import sparse_student

    OutputFolder(out, overwrite=overwrite, resume=resume).check()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    device, own_group = distributed.start_process_group(device)
    try:
        teacher_model, tokenizer = load_model(teacher, device=device)
        student, _ = load_model(from_dir or teacher, device=device)
        layers = sparse_student(student, teacher_model, from_dir, pruned=pruned, slorb_k=slorb or None,
                                slorb_trainable_projection=slorb_trainable_projection)
        return retrain(student, teacher_model, tokenizer, layers, config, out, resume=resume, overwrite=overwrite,
                       progress=progress, start={"from": from_dir or "dense + magnitude", "teacher": teacher,
                                                 "pruned": pruned, "slorb": slorb})
    finally:
        if own_group:
            dist.destroy_process_group()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
