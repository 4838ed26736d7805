"""Per-layer solve time and reconstruction error of every solver, on real layers or real layer shapes.

    python -m benchmarks.bench_solvers [--shapes 576x1536,1536x576] [--patterns 0.5,0.8,2:4] [--repeats 3]
    python -m benchmarks.bench_solvers --real smollm2-135m --layer 1 --name bench_solvers_real

Synthetic problems: inputs from ``benchmarks/synthetic.py`` (``N = 2 * in_features`` tokens), a
Gaussian weight. ``--real MODEL``: every linear of decoder layer ``--layer`` of the dense model, its
own weight and the Gram matrix of its inputs over ``--nsamples`` x ``--seq-len`` wiki calibration
tokens. Timing covers the solve from a given Gram matrix (accumulation excluded), median of
``--repeats``. Writes ``benchmarks/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import metadata, write_json
from benchmarks.synthetic import llm_like_inputs
from sparsesolve.core.patterns import parse_pattern
from sparsesolve.core.solvers import SOLVERS, refit

SHAPES = "576x1536,1536x576,768x3072,3072x768"  # add 4096x4096 with --shapes (about 20 min on 2 cores)


Problem = tuple[str, torch.Tensor, torch.Tensor]  # (label, weight out x in, Gram in x in)


def synthetic_problems(shapes: list[tuple[int, int]], seed: int) -> list[Problem]:
    """A Gaussian weight and LLM-like inputs (``2 * in_features`` tokens) per shape."""
    problems = []
    for out_features, in_features in shapes:
        x = llm_like_inputs(2 * in_features, in_features, seed)
        weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
        problems.append(("synthetic", weight, x.T @ x))
    return problems


def real_problems(model_name: str, layer: int, nsamples: int, seq_len: int) -> list[Problem]:
    """Every linear of decoder layer ``layer`` of the dense model with the Gram of its calibration inputs."""
    from sparsesolve.lm.adapters import get_adapter
    from sparsesolve.lm.data import calibration_windows, corpus_tokens
    from sparsesolve.lm.models import load_model

    model, tokenizer = load_model(model_name)
    linears = get_adapter(model).layer_map(model, layer).linears
    grams = {lin.name: torch.zeros(lin.weight.shape[1], lin.weight.shape[1], dtype=torch.float64) for lin in linears}

    def hook(name: str):
        def accumulate(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] += x.T @ x
        return accumulate

    handles = [lin.module.register_forward_pre_hook(hook(lin.name)) for lin in linears]
    windows = calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), nsamples, seq_len, seed=0)
    with torch.no_grad():
        for window in windows.split(4):
            model(window)
    for handle in handles:
        handle.remove()
    return [(lin.name, lin.weight.float().clone(), grams[lin.name].float()) for lin in linears]


def run(problems: list[Problem], patterns: list[str], repeats: int) -> list[dict]:
    """One row per (problem, pattern, solver): seconds (median), relative error, iterations, escalations."""
    rows = []
    for label, weight, gram in problems:
        out_features, in_features = weight.shape
        for spec in patterns:
            pattern = parse_pattern(spec)
            for name, solver in [*SOLVERS.items(), ("refit(magnitude mask)", None)]:
                times, result = [], None
                for _ in range(repeats if in_features * out_features < 4e6 else 1):
                    started = time.perf_counter()
                    if solver is None:
                        result = refit(weight, gram, pattern.project(weight.abs()))
                    else:
                        result = solver(weight, gram, pattern)
                    times.append(time.perf_counter() - started)
                rows.append({"layer": label, "shape": [out_features, in_features], "pattern": str(pattern), "solver": name,
                             "seconds": statistics.median(times), "relative_error": result.relative_error,
                             "iterations": result.iterations, "escalations": result.escalations})
                print(f"{label} {out_features}x{in_features} {pattern!s:>5} {name:<22} {rows[-1]['seconds']:8.3f}s "
                      f"rel.err {result.relative_error:.4f}", flush=True)
    return rows


def main() -> None:
    """Parse arguments, run, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated OUTxIN layer shapes")
    parser.add_argument("--patterns", default="0.5,0.8,2:4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", metavar="MODEL", help="solve the real linears of MODEL's decoder layer --layer")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows for --real (default 16)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--name", default="bench_solvers", help="results/NAME.json (README reads bench_solvers*.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.real:
        problems = real_problems(args.real, args.layer, args.nsamples, args.seq_len)
    else:
        problems = synthetic_problems([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")], args.seed)
    rows = run(problems, args.patterns.split(","), args.repeats)
    path = write_json(args.name, {"meta": metadata("benchmarks.bench_solvers", args.seed), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
