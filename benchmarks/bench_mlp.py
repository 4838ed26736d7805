"""Every method on the demo's small MLPs (``make demo``), recorded as JSON for the README.

    python -m benchmarks.bench_mlp

Writes ``benchmarks/results/mlp_methods.json``.
"""

from __future__ import annotations

import torch

from benchmarks.common import metadata, write_json
from sparsesolve.demo import compare


def main() -> None:
    """Run the comparison with two threads and save it."""
    torch.set_num_threads(2)
    rows = compare()
    print(f"wrote {write_json('mlp_methods', {'meta': metadata('benchmarks.bench_mlp', 0), 'rows': rows})}")


if __name__ == "__main__":
    main()
