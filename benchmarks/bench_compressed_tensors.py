"""A 2:4 + 4-bit SmolLM2 through the compressed-tensors export: same weights and perplexity in plain transformers.

    python -m benchmarks.bench_compressed_tensors             # P1: sparsegpt 2:4, 4 bits, groups of 64

Prunes with ``run_prune`` (sparsegpt's joint pass; groups of 64 because SmolLM2's 576 inputs are not
a multiple of 128 and compressed-tensors' group strategy needs whole groups), exports with
``--format compressed-tensors``, reloads the export with ``AutoModelForCausalLM.from_pretrained`` (no
sparsesolve code on the load path), compares every tensor with the pruned folder and scores wiki and
PTB with the P1 protocol. Writes ``results/compressed_tensors.json`` with the sizes of the pruned
folder's weights, the export and sparsesolve's own compressed format.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.common import RESULTS, metadata, source_note, write_json


def main() -> None:
    """Prune, export both ways, reload with transformers, compare and score."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--groupsize", type=int, default=64)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=64)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from sparsesolve.config import CalibrationConfig, EvaluationConfig, RunConfig
    from sparsesolve.core.config import PruneConfig
    from sparsesolve.core.quantize import GroupQuantizer
    from sparsesolve.deploy.compressed_tensors import export_compressed_tensors
    from sparsesolve.deploy.export import export_compressed
    from sparsesolve.pipeline import evaluate_model, run_prune

    work = Path(tempfile.mkdtemp(prefix="bench_ct_"))
    try:
        evaluation = EvaluationConfig(("wiki", "ptb"), windows=args.eval_windows)
        done = run_prune(RunConfig(args.model, PruneConfig(args.pattern, method="sparsegpt",
                                                           quantizer=GroupQuantizer(args.bits, args.groupsize)),
                                   CalibrationConfig("wiki", args.nsamples), evaluation, out=str(work / "pruned")),
                         say=print)
        ct = export_compressed_tensors(work / "pruned", work / "ct")
        own = export_compressed(work / "pruned", work / "own")
        loaded = AutoModelForCausalLM.from_pretrained(work / "ct")
        saved = load_file(str(work / "pruned" / "model.safetensors"))
        state = loaded.state_dict()
        exact = all(torch.equal(state[k], v) for k, v in saved.items())
        scored = evaluate_model(loaded, done.tokenizer, evaluation, progress=False)
        row = {"pattern": args.pattern, "bits": args.bits, "groupsize": args.groupsize, "bit_exact": exact,
               "perplexity_pruned_folder": done.pruned, "perplexity_compressed_tensors": scored,
               "bytes": {"pruned_folder_weights": (work / "pruned" / "model.safetensors").stat().st_size,
                         "compressed_tensors": ct["bytes"]["weights"], "sparsesolve_compressed": own["bytes"]["compressed"],
                         "dense_float16": own["bytes"]["dense_float16"]},
               "quantized_linears": ct["quantized_linears"], "sparsity": ct["sparsity"]}
        print(row, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json("compressed_tensors", {"meta": metadata("benchmarks.bench_compressed_tensors", 0), "model": args.model,
                                      "rows": [row]})


def table(folder: Path = RESULTS) -> str:
    """The README table of ``FOLDER/compressed_tensors.json``."""
    data = json.loads((folder / "compressed_tensors.json").read_text())
    mib = 2**20
    lines = ["| configuration | wiki / PTB: pruned folder | wiki / PTB: compressed-tensors in transformers | bit-exact | "
             "pruned folder | compressed-tensors | sparsesolve compressed | dense float16 |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        a, b, size = r["perplexity_pruned_folder"], r["perplexity_compressed_tensors"], r["bytes"]
        lines.append(f"| {r['pattern']} + {r['bits']}-bit (groups of {r['groupsize']}) | {a['wiki']:.2f} / {a['ptb']:.2f} | "
                     f"{b['wiki']:.2f} / {b['ptb']:.2f} | {'yes' if r['bit_exact'] else 'NO'} | "
                     f"{size['pruned_folder_weights'] / mib:.1f} MiB | {size['compressed_tensors'] / mib:.1f} MiB | "
                     f"{size['sparsesolve_compressed'] / mib:.1f} MiB | {size['dense_float16'] / mib:.1f} MiB |")
    versions = data["meta"]["versions"]
    return "\n".join(lines) + source_note(data["meta"], f"torch {versions['torch']}, transformers {versions['transformers']}")


if __name__ == "__main__":
    main()
