"""Per-layer solve time and reconstruction error of every solver on layer shapes of real models.

    python -m benchmarks.bench_solvers [--shapes 576x1536,1536x576] [--patterns 0.5,0.8,2:4] [--repeats 3]

Inputs are synthetic (``benchmarks/synthetic.py``, ``N = 2 * in_features`` tokens); the weight is
Gaussian. Timing covers the solve from a given Gram matrix (accumulation excluded), median of
``--repeats``. Writes ``benchmarks/results/bench_solvers.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import metadata, write_json
from benchmarks.synthetic import llm_like_inputs
from sparsesolve.patterns import parse_pattern
from sparsesolve.solvers import SOLVERS, refit

SHAPES = "576x1536,1536x576,768x3072,3072x768"  # add 4096x4096 with --shapes (about 20 min on 2 cores)


def run(shapes: list[tuple[int, int]], patterns: list[str], repeats: int, seed: int) -> list[dict]:
    """One row per (shape, pattern, solver): seconds (median), relative error, iterations, escalations."""
    rows = []
    for out_features, in_features in shapes:
        x = llm_like_inputs(2 * in_features, in_features, seed)
        gram = x.T @ x
        weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
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
                rows.append({"shape": [out_features, in_features], "pattern": str(pattern), "solver": name,
                             "seconds": statistics.median(times), "relative_error": result.relative_error,
                             "iterations": result.iterations, "escalations": result.escalations})
                print(f"{out_features}x{in_features} {pattern!s:>5} {name:<22} {rows[-1]['seconds']:8.3f}s "
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
    parser.add_argument("--name", default="bench_solvers", help="results/NAME.json (README reads bench_solvers*.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = run(shapes, args.patterns.split(","), args.repeats, args.seed)
    path = write_json(args.name, {"meta": metadata("benchmarks.bench_solvers", args.seed), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
