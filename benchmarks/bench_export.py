"""On-disk size of the compressed format against the dense folder, per pattern and value dtype.

    python -m benchmarks.bench_export                       # SmolLM2 at 50 %, 2:4, 70 %, 90 %

Sizes depend only on the masks' pattern, not on which method chose them, so the models are pruned by
magnitude (seconds instead of minutes). Each is saved as a sparsesolve folder (float32, zeros in
place), exported with float32 and with float16 values, and reloaded: the weights must equal the
saved ones bit for bit (cast to float16 for the float16 export). Writes ``results/export_sizes.json``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.common import metadata, write_json


def main() -> None:
    """Prune, save, export, reload and compare, per pattern."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patterns", default="0.5,2:4,0.7,0.9")
    args = parser.parse_args()

    from sparsesolve.config import CalibrationConfig, EvaluationConfig, RunConfig
    from sparsesolve.core.config import PruneConfig
    from sparsesolve.deploy.export import export_compressed
    from sparsesolve.lm.models import load_model
    from sparsesolve.pipeline import run_prune

    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        for spec in args.patterns.split(","):
            saved = work / "pruned"
            done = run_prune(RunConfig(args.model, PruneConfig(spec, method="magnitude"), CalibrationConfig("wiki", 1, 128),
                                       EvaluationConfig(corpora=(), seq_len=128), out=str(saved), overwrite=True),
                             progress=False)
            result, expected = done.prune, done.model.state_dict()
            row = {"pattern": spec, "sparsity": result.sparsity}
            for dtype in (torch.float32, torch.float16):
                out = work / f"compressed-{dtype}"
                report = export_compressed(saved, out, dtype=dtype, overwrite=True)
                again = load_model(str(out), dtype=dtype)[0].state_dict()
                exact = all(torch.equal(again[k], v.to(dtype)) for k, v in expected.items())
                row[str(dtype).removeprefix("torch.")] = {**report["bytes"], "encodings": report["encodings"],
                                                          "bit_exact": exact}
                print(spec, dtype, f"{report['bytes']['compressed'] / 2**20:.1f} MiB", "exact" if exact else "DIFFERS",
                      flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json("export_sizes", {"meta": metadata("benchmarks.bench_export", 0), "model": args.model, "rows": rows})


if __name__ == "__main__":
    main()
