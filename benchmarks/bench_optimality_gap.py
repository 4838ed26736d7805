"""How close each solver gets to the optimal mask, on tiny layers where brute force is exact.

    python -m benchmarks.bench_optimality_gap [--seeds 200]

Each problem: a 4 x 8 Gaussian weight, 32 correlated Gaussian tokens; the optimum enumerates every
mask the pattern allows, each with its exact refit. The gap is ``error / optimum - 1``. Solvers run
with their default damping (0.01), which is part of what they are. Writes
``benchmarks/results/optimality_gap.json``.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import metadata, write_json
from sparsesolve.core.patterns import NM, Unstructured
from sparsesolve.core.reference import brute_force, random_problem
from sparsesolve.core.solvers import SOLVERS, reconstruction_error


def main() -> None:
    """Run every solver on ``--seeds`` problems per pattern; print and save the gap distribution."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args()
    rows = []
    for pattern in (Unstructured(0.5), NM(2, 4), Unstructured(0.75)):
        gaps: dict[str, list[float]] = {name: [] for name in SOLVERS}
        for seed in range(args.seeds):
            weight, gram = random_problem(seed)
            optimum = brute_force(weight, gram, pattern)[2]
            for name, solver in SOLVERS.items():
                gaps[name].append(reconstruction_error(solver(weight, gram, pattern).weight, weight, gram) / optimum - 1)
        for name, values in gaps.items():
            v = np.array(values)
            rows.append({"pattern": str(pattern), "solver": name, "median": float(np.median(v)),
                         "p90": float(np.quantile(v, 0.9)), "max": float(v.max()),
                         "optimal_fraction": float((v < 1e-3).mean()), "problems": len(v)})
            print(f"{pattern!s:>5} {name:<10} median {rows[-1]['median']:.3f} p90 {rows[-1]['p90']:.3f} "
                  f"max {rows[-1]['max']:.3f} within 0.1% of optimum {rows[-1]['optimal_fraction']:.0%}")
    path = write_json("optimality_gap", {"meta": metadata("benchmarks.bench_optimality_gap", 0), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
