"""The ``sparsesolve`` command: ``prune`` a language model, ``eval`` its perplexity, ``retrain`` it (AST),
``export`` it compressed.

Bad input (unknown model, method, pattern or corpus, a sparsity outside [0, 1), a pattern that does
not fit a layer, a corpus too short for one window, a window longer than the model's context, an
output folder that exists) ends with one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from sparsesolve.api import METHODS
from sparsesolve.data import CORPORA, calibration_windows, corpus_tokens
from sparsesolve.decoder import check_prunable, prune_decoder
from sparsesolve.environment import environment, peak_memory_mb
from sparsesolve.evaluate import check_seq_len, perplexity
from sparsesolve.export import export_compressed
from sparsesolve.models import BUNDLED, load_model
from sparsesolve.output import OutputFolder
from sparsesolve.patterns import parse_pattern
from sparsesolve.quantize import GroupQuantizer
from sparsesolve.retrain.command import add_retrain_parser, run_retrain
from sparsesolve.solvers import SOLVERS

__all__ = ["main", "build_parser"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line."""

    def error(self, message: str) -> NoReturn:
        """Print ``sparsesolve: error: message`` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _corpora(value: str) -> list[str]:
    names = [] if value == "none" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in CORPORA]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown corpus {unknown[0]!r}; choose from {', '.join(CORPORA)} (or 'none')")
    return names


def _add_eval_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512; the papers use 2048)")
    parser.add_argument("--eval-windows", type=int, default=64,
                        help="first N test windows per corpus (default 64, protocol P1); 0 = the whole split")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--data", "--eval", dest="data", type=_corpora, default=_corpora(default),
                        help=f"comma-separated corpora to evaluate ({', '.join(CORPORA)}; 'none'); default {default}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    """The ``sparsesolve`` argument parser."""
    parser = _Parser(prog="sparsesolve", description="Prune language models by coordinated masked least squares.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prune = commands.add_parser("prune", help="prune a model and save it with its masks and a report")
    prune.add_argument("--model", default="smollm2-135m",
                       help=f"bundled name ({', '.join(BUNDLED)}), local folder or hub id (default smollm2-135m)")
    prune.add_argument("--method", choices=METHODS, default="sparsellm", help="default sparsellm")
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", help="unstructured fraction of zeros per row, e.g. 0.7")
    target.add_argument("--pattern", help="'2:4', '4:8', '3:4' (N zeros in every M inputs) or '70%%'")
    prune.add_argument("--layers", default="all", help="'all' (default), 'first-half' (the paper's setting), 'A:B', 'i,j'")
    prune.add_argument("--solver", choices=SOLVERS, default="sparsegpt",
                       help="per-layer solver inside sparsellm and for attention (default sparsegpt)")
    prune.add_argument("--iterations", type=int, default=None, help="sparsellm iterations (default 1 for language models)")
    prune.add_argument("--damp", type=float, default=None, help="relative damping of every solve (default 0.01)")
    prune.add_argument("--wbits", type=int, default=None,
                       help="also quantise the kept weights to this many bits (2-8), compensated inside SparseGPT's "
                            "OBS pass (--method sparsegpt)")
    prune.add_argument("--groupsize", type=int, default=128, help="inputs per quantisation group (default 128)")
    prune.add_argument("--calib", choices=list(CORPORA), default="wiki", help="calibration corpus (default wiki)")
    prune.add_argument("--nsamples", type=int, default=64, help="calibration windows (default 64)")
    prune.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    prune.add_argument("--storage-dtype", choices=list(DTYPES), default=None,
                       help="dtype of stored activations (default: the model's); solves are float32 regardless")
    prune.add_argument("--device", default=None, help="where layers are processed, e.g. cuda (default cpu)")
    prune.add_argument("--out", required=True, help="output folder (written atomically)")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    prune.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    prune.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_eval_options(prune, "wiki,ptb")

    evaluate = commands.add_parser("eval", help="perplexity of a model on test corpora")
    evaluate.add_argument("--model", required=True, help="bundled name, local folder (e.g. a pruned --out) or hub id")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_eval_options(evaluate, "wiki,ptb")
    add_retrain_parser(commands)

    export = commands.add_parser("export", help="write a pruned model folder in a compressed format")
    export.add_argument("--model", required=True, help="a sparsesolve prune or retrain output folder")
    export.add_argument("--format", choices=["compressed"], default="compressed",
                        help="compressed: kept values plus a packed bitmask or indices per pruned linear (safetensors)")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="store every floating tensor in this dtype (default: as saved)")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    export.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    return parser


def _say(message: str) -> None:
    print(message, flush=True)


def _evaluate(model: Any, tokens: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    windows = args.eval_windows or None
    return {name: perplexity(model, ids, args.seq_len, windows, batch_size=args.batch_size, progress=not args.quiet)
            for name, ids in tokens.items()}


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, low in (("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1),
                             ("--eval-windows", args.eval_windows, 0), ("--nsamples", getattr(args, "nsamples", 1), 1),
                             ("--iterations", getattr(args, "iterations", 0) or 0, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")


def _prune(args: argparse.Namespace) -> int:
    _check_numbers(args)
    pattern = parse_pattern(args.pattern if args.pattern is not None else args.sparsity)
    if args.method != "sparsellm" and args.iterations is not None:
        raise ValueError("--iterations applies to --method sparsellm only")
    if args.wbits is not None and args.method != "sparsegpt":
        raise ValueError("--wbits (joint quantisation) needs --method sparsegpt, whose OBS pass compensates it")
    GroupQuantizer(args.wbits or 8, args.groupsize)  # checks the numbers before any work
    out = OutputFolder(args.out, overwrite=args.overwrite, resume=args.resume)
    out.check()
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    check_seq_len(model, args.seq_len)
    layers = check_prunable(model, pattern, args.layers)
    calibration = calibration_windows(corpus_tokens(tokenizer, args.calib, "train"), args.nsamples, args.seq_len, args.seed)
    tests = {name: corpus_tokens(tokenizer, name, "test") for name in args.data}
    resumed = out.begin()
    _say(f"{'resuming' if resumed else 'pruning'} {args.model} ({model.config.model_type}, {len(layers)} layers) with "
         f"{args.method} at {pattern}; calibration {args.nsamples} x {args.seq_len} tokens of {args.calib}")
    tick = time.perf_counter()
    dense = out.read_json("dense.json") if resumed else None
    if dense is None:
        dense = _evaluate(model, tests, args)
        out.write_json("dense.json", dense)
    eval_seconds = time.perf_counter() - tick
    sparsellm_options = {"iterations": args.iterations} if args.iterations is not None else {}
    solver_options: dict[str, Any] = {"damp": args.damp} if args.damp is not None else {}
    if args.wbits is not None:
        solver_options["quantizer"] = GroupQuantizer(args.wbits, args.groupsize)
    result = prune_decoder(model, calibration, pattern, method=args.method, layers=layers, solver=args.solver,
                           solver_options=solver_options, sparsellm_options=sparsellm_options,
                           storage_dtype=DTYPES.get(args.storage_dtype), device=args.device,
                           checkpoint_dir=out.checkpoints, resume=resumed, progress=not args.quiet)
    tick = time.perf_counter()
    pruned = _evaluate(model, tests, args)
    eval_seconds += time.perf_counter() - tick
    report = {
        "command": "sparsesolve " + " ".join(shlex.quote(a) for a in args.argv),
        "model": args.model, "model_note": BUNDLED[args.model].description if args.model in BUNDLED else None,
        "method": args.method, "pattern": str(pattern), "solver": args.solver, "layers": layers,
        "quantization": None if args.wbits is None else {"bits": args.wbits, "groupsize": args.groupsize},
        "calibration": {"corpus": args.calib, "windows": args.nsamples, "seq_len": args.seq_len, "seed": args.seed},
        "evaluation": {"seq_len": args.seq_len, "windows": args.eval_windows or "all"},
        "perplexity": {"dense": dense, "pruned": pruned},
        "sparsity": result.sparsity, "escalations": result.escalations, "resumed_layers": result.resumed_layers,
        "seconds": {"total": time.perf_counter() - started, "prune": result.seconds,
                    "forward": result.forward_seconds, "solve": result.solve_seconds, "evaluation": eval_seconds},
        "peak_memory_mb": peak_memory_mb(), **environment(), "layers_detail": result.layers,
    }
    path = out.commit(model, tokenizer, result.masks, report)
    _say(f"sparsity {result.sparsity:.4f} over the pruned linears; pruning {result.seconds:.1f} s "
         f"(forward {result.forward_seconds:.1f} s, solves {result.solve_seconds:.1f} s); peak memory {peak_memory_mb():.0f} MiB")
    for name in tests:
        _say(f"perplexity {name}: dense {dense[name]:.2f} -> pruned {pruned[name]:.2f}")
    _say(f"saved {path} (report.json, masks.safetensors)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    _check_numbers(args)
    if not args.data:
        raise ValueError("nothing to evaluate: pass --data wiki,ptb")
    model, tokenizer = load_model(args.model)
    check_seq_len(model, args.seq_len)
    tests = {name: corpus_tokens(tokenizer, name, "test") for name in args.data}
    for name, value in _evaluate(model, tests, args).items():
        _say(f"perplexity {name} ({args.eval_windows or 'all'} windows of {args.seq_len}): {value:.2f}")
    return 0


def _export(args: argparse.Namespace) -> int:
    report = export_compressed(args.model, args.out, dtype=DTYPES.get(args.dtype), overwrite=args.overwrite)
    sizes = report["bytes"]
    _say(f"saved {args.out}: {sizes['compressed'] / 2**20:.1f} MiB of weights ({report['encodings']['bitmask']} bitmask, "
         f"{report['encodings']['indices']} index-encoded linears) against {sizes['source_weights'] / 2**20:.1f} MiB "
         f"saved, {sizes['dense_float16'] / 2**20:.1f} MiB dense float16")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on bad input, 130 on interruption)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return {"prune": _prune, "eval": _eval, "retrain": run_retrain, "export": _export}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"sparsesolve: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsesolve: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
