"""Joint sparsity and quantisation on SmolLM2: perplexity and on-disk size (the AST paper's compression claim).

    python -m benchmarks.bench_quantized       # 2:4 + 4-bit and 50 % + 8-bit, protocol P1, with sparsegpt

Each configuration runs ``sparsesolve prune --method sparsegpt --wbits B`` (the quantisation error
compensated inside the OBS pass; P1 calibration and evaluation), then ``sparsesolve export`` (kept
values as ``B``-bit codes on their recovered grids plus the packed mask; once with the other tensors,
the embedding among them, in float32 and once in float16), and records perplexities, the exports'
sizes and the dense float16 size for comparison. A finished prune in ``--work`` is reused. The model folders go to ``--work``.
Writes ``results/quantized.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import metadata, write_json

CONFIGS = {"2:4 + 4-bit": ("--pattern", "2:4", "4"), "50 % + 8-bit": ("--sparsity", "0.5", "8")}


def _done(folder: Path, bits: int, groupsize: int) -> bool:
    """Whether ``folder`` already holds a finished prune with this quantisation (then it is reused)."""
    report = folder / "report.json"
    return report.exists() and json.loads(report.read_text()).get("quantization") == {"bits": bits, "groupsize": groupsize}


def main() -> None:
    """Prune, export and record every configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--groupsize", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_quantized"))
    args = parser.parse_args()

    from sparsesolve.cli import main as cli

    rows = []
    for label, (flag, value, bits) in CONFIGS.items():
        stem = f"{value.replace(':', '-')}-w{bits}"
        pruned, small, half = (args.work / f"{stem}{suffix}" for suffix in ("", "-compressed", "-compressed-fp16"))
        common = ["--model", args.model, "--method", "sparsegpt", flag, value, "--wbits", bits,
                  "--groupsize", str(args.groupsize), "--quiet", "--overwrite"]
        if not _done(pruned, int(bits), args.groupsize) and cli(["prune", *common, "--out", str(pruned)]) != 0:
            raise SystemExit(f"prune failed for {label}")
        for extra, out in (([], small), (["--dtype", "float16"], half)):
            if cli(["export", "--model", str(pruned), "--out", str(out), "--overwrite", *extra]) != 0:
                raise SystemExit(f"export failed for {label}")
        report = json.loads((pruned / "report.json").read_text())
        sizes = json.loads((small / "compression.json").read_text())
        sizes_half = json.loads((half / "compression.json").read_text())
        rows.append({"config": label, "bits": int(bits), "groupsize": args.groupsize, "pattern": report["pattern"],
                     "perplexity": report["perplexity"], "sparsity": report["sparsity"], "bytes": sizes["bytes"],
                     "bytes_rest_float16": sizes_half["bytes"]["compressed"],
                     "encodings": sizes["encodings"], "prune_seconds": report["seconds"]["prune"],
                     "calibration": report["calibration"], "evaluation": report["evaluation"]})
    write_json("quantized", {"meta": metadata("benchmarks.bench_quantized", 0), "model": args.model, "rows": rows})


if __name__ == "__main__":
    main()
