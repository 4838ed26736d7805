"""Record a finished ``sparsesolve prune`` run (its ``report.json``) as ``benchmarks/results/lm_NAME.json``.

    python -m benchmarks.record_run runs/demo-smollm2-sparsellm-70 demo

The README's language-model table (``python -m benchmarks.update_readme``) lists every ``lm_*.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import git_commit, write_json


def main() -> None:
    """Copy the report (minus its per-layer detail, summarised) with the commit and the run's date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="output folder of sparsesolve prune")
    parser.add_argument("name", help="results/lm_NAME.json")
    args = parser.parse_args()
    report = json.loads((args.run / "report.json").read_text())
    layers = report.pop("layers_detail")
    report["ffn_relative_error"] = {"median": sorted(r["ffn"]["relative_error"] for r in layers)[len(layers) // 2],
                                    "start_median": sorted(r["ffn"]["start_relative_error"] for r in layers)[len(layers) // 2]}
    report["commit"] = git_commit()
    report["date"] = time_of(args.run / "report.json")
    print(write_json(f"lm_{args.name}", report))


def time_of(path: Path) -> str:
    """Modification time of ``path`` as UTC ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))


if __name__ == "__main__":
    main()
