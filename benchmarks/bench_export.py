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

    from sparsesolve import prune
    from sparsesolve.data import calibration_windows, corpus_tokens
    from sparsesolve.export import export_compressed
    from sparsesolve.models import load_model
    from sparsesolve.output import OutputFolder
    from sparsesolve.patterns import parse_pattern

    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        for spec in args.patterns.split(","):
            model, tokenizer = load_model(args.model)
            windows = calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), 1, 128)
            result = prune(model, windows, method="magnitude", pattern=parse_pattern(spec), progress=False)
            saved = work / "pruned"
            shutil.rmtree(saved, ignore_errors=True)
            folder = OutputFolder(saved)
            folder.begin()
            folder.commit(model, tokenizer, result.masks, {})
            expected = model.state_dict()
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
