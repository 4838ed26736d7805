"""Token-sharded pruning: one rank against K ranks on the same calibration windows.

    python -m benchmarks.bench_distributed                     # SmolLM2, P1 64 x 512, sparsellm 2:4, 1 and 2 ranks

Each run is ``torchrun --standalone --nproc-per-node K -m sparsesolve prune ... --threads 1`` (one torch
thread per rank, ``--data none``: the weights are compared, not scored) into a temporary folder; with
the defaults each rank's share is whole forward batches and token chunks of the one-rank run (README,
"Beyond one device", says why that matters in float32). A row
per run: ranks, threads per rank, tokens, method, pattern, the pruning wall time (rank 0's), the peak
resident memory per rank (the highest rank), the resident memory when pruning started and its peak
during pruning (the difference is what the calibration activations and the solves added: the
high-water mark is reset when pruning starts) and the largest relative Frobenius difference
of a pruned weight against the one-rank run, with the share of identical masks. ``predicted_mb`` is
``lm.memory.pruning_memory``'s per-rank working set for the same run. Run it on an otherwise idle
machine: K ranks need K cores. Writes ``results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from benchmarks.common import RESULTS, metadata, source_note, write_json


def _prune(ranks: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "sparsesolve", "prune", "--model", args.model, "--method", args.method, "--pattern", args.pattern,
               "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len), "--layers", args.layers,
               "--calib-batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size),
               "--data", "none", "--threads", "1", "--quiet", "--out", str(out), "--overwrite"]
    tick = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads((out / "report.json").read_text())
    report["wall_total_s"] = time.perf_counter() - tick
    return report


def _compare(folder: Path, single: Path) -> tuple[float, float]:
    """Largest relative difference of a pruned weight and the share of identical masks, against ``single``."""
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(single / "model.safetensors"))
    masks_a, masks_b = load_file(str(folder / "masks.safetensors")), load_file(str(single / "masks.safetensors"))
    worst = max(float((a[f"{n}.weight"].double() - b[f"{n}.weight"].double()).norm()
                      / b[f"{n}.weight"].double().norm().clamp_min(1e-30)) for n in masks_a)
    same = sum(int((masks_a[n] == masks_b[n]).sum()) for n in masks_a) / sum(m.numel() for m in masks_a.values())
    return worst, same


def main() -> None:
    """Run one rank, then each K of ``--ranks``, and write the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="sparsellm")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--chunk-size", type=int, default=1024,
                        help="tokens per chunk of the FFN work (the chunk temporaries do not divide by the ranks: "
                             "a sharded run keeps them small; 1024 is also faster than 8192 on one rank here)")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts; the first is the reference")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of distributed.json")
    args = parser.parse_args()

    from sparsesolve.lm.memory import pruning_memory_of

    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    rows = []
    try:
        counts = [int(k) for k in args.ranks.split(",")]
        for ranks in counts:
            out = work / f"ranks{ranks}"
            report = _prune(ranks, out, args)
            diff, same = _compare(out, work / f"ranks{counts[0]}")
            stage = max(report["prune_memory_mb_per_rank"], key=lambda m: m["peak"] - m["before"])
            row = {"ranks": ranks, "threads_per_rank": 1, "tokens": args.nsamples * args.seq_len,
                   "chunk_size": args.chunk_size,
                   "method": args.method, "pattern": args.pattern, "layers": args.layers,
                   "wall_s": report["seconds"]["prune"], "wall_total_s": report["wall_total_s"],
                   "forward_s": report["seconds"]["forward"], "solve_s": report["seconds"]["solve"],
                   "peak_rss_mb_per_rank": max(report["peak_memory_mb_per_rank"]),
                   "rss_before_pruning_mb_per_rank": stage["before"], "pruning_peak_rss_mb_per_rank": stage["peak"],
                   "activation_peak_mb_per_rank": stage["peak"] - stage["before"],
                   "predicted_mb": pruning_memory_of(out, tokens=args.nsamples * args.seq_len, ranks=ranks,
                                                     method=args.method, chunk_size=args.chunk_size)["total"] / 2**20,
                   "max_rel_weight_diff_vs_single": diff, "identical_mask_fraction": same}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]
    for row in rows:
        row["wall_vs_single"] = row["wall_s"] / base["wall_s"]
        row["activation_memory_vs_single"] = row["activation_peak_mb_per_rank"] / base["activation_peak_mb_per_rank"]
    write_json("distributed", {"meta": {**metadata("benchmarks.bench_distributed", 0), "torch_threads": 1,
                                        "cpus_used": max(counts), "torch": torch.__version__},
                               "model": args.model, "rows": rows}, args.out)


def table(folder: Path = RESULTS) -> str:
    """The README table of ``FOLDER/distributed.json``."""
    data = json.loads((folder / "distributed.json").read_text())
    lines = ["| ranks x threads | tokens | method | pattern | pruning wall s (vs 1 rank) | peak RSS per rank MiB | "
             "pruning adds per rank MiB (vs 1 rank; model predicts) | max rel. weight diff vs 1 rank | identical masks |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['ranks']} x {r['threads_per_rank']} | {r['tokens']:,} | {r['method']} | {r['pattern']} | "
                     f"{r['wall_s']:.0f} ({r['wall_vs_single']:.2f}x) | {r['peak_rss_mb_per_rank']:.0f} | "
                     f"{r['activation_peak_mb_per_rank']:.0f} ({r['activation_memory_vs_single']:.2f}x; "
                     f"{r['predicted_mb']:.0f}) | {r['max_rel_weight_diff_vs_single']:.1e} | "
                     f"{r['identical_mask_fraction']:.4%} |")
    meta = data["meta"]
    return "\n".join(lines) + source_note(meta, f"{meta['machine']['cpus']} CPUs, one torch thread per rank, torch {meta['torch']}")


if __name__ == "__main__":
    main()
