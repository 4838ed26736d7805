"""The ``sparsesolve`` command: ``prune`` a language model, ``eval`` its perplexity, ``retrain`` it (AST),
``export`` it compressed. A thin shell: flags come from the configuration dataclasses' fields, each
command builds its configs and calls ``sparsesolve.pipeline`` (or ``deploy.export``).

Bad input (unknown model, method, pattern or corpus, a sparsity outside [0, 1), a pattern that does
not fit a layer, a corpus too short for one window, a window longer than the model's context, an
output folder that exists or cannot be written, unreadable model files) ends with one line on stderr
and exit status 2, before anything is written. Nothing here imports torch until a command runs, so
``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from sparsesolve.config import CalibrationConfig, EvaluationConfig, RunConfig
from sparsesolve.core.config import PruneConfig, SparseLLMConfig
from sparsesolve.flags import add_config_flags, config_values
from sparsesolve.lm.bundled import BUNDLED
from sparsesolve.retrain.config import RetrainConfig

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line."""

    def error(self, message: str) -> NoReturn:
        """Print ``sparsesolve: error: message`` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


#: the PruneConfig fields that are flags of their own (the pattern, solver options and quantiser are built below)
PRUNE_FLAGS = ("method", "solver", "layers", "storage_dtype", "device", "batch_size", "chunk_size", "allocation",
               "allocation_range", "allocation_unit", "allocation_ffn_scale", "mask_scope", "true_sequential")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _evaluation_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, EvaluationConfig, prefix="eval_")


def build_parser() -> argparse.ArgumentParser:
    """The ``sparsesolve`` argument parser."""
    parser = _Parser(prog="sparsesolve", description="Prune language models by coordinated masked least squares.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prune = commands.add_parser("prune", help="prune a model and save it with its masks and a report")
    prune.add_argument("--model", default="smollm2-135m",
                       help=f"bundled name ({', '.join(BUNDLED)}), local folder or hub id (default smollm2-135m)")
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", help="unstructured fraction of zeros per row, e.g. 0.7 or 70%%")
    target.add_argument("--pattern", help="'2:4', '4:8', '3:4' (N zeros in every M inputs) or '70%%'")
    add_config_flags(prune, PruneConfig, PRUNE_FLAGS,
                     shown_defaults={"layers": "all", "device": "cpu, where the model is loaded", "storage_dtype": "the model's"})
    prune.add_argument("--damp", type=float, default=None, help="relative damping of every solve (default 0.01)")
    prune.add_argument("--wbits", type=int, default=None,
                       help="also quantise the kept weights to this many bits (2-8), compensated inside SparseGPT's "
                            "OBS pass (--method sparsegpt)")
    prune.add_argument("--groupsize", type=int, default=128, help="inputs per quantisation group (default 128)")
    coordinator = prune.add_argument_group("sparsellm", "settings of the FFN coordinator (--method sparsellm only)")
    add_config_flags(coordinator, SparseLLMConfig, prefix="sparsellm_", unset=True,
                     shown_defaults=SparseLLMConfig.for_language_models().to_dict())
    add_config_flags(prune, CalibrationConfig, ("corpus", "windows", "seed"), prefix="calib_")
    _evaluation_flags(prune)
    prune.add_argument("--out", required=True, help="output folder, written atomically (about 650 MB for SmolLM2)")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    prune.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    _common(prune)

    evaluate = commands.add_parser("eval", help="perplexity of a model on test corpora")
    evaluate.add_argument("--model", required=True, help="bundled name, local folder (e.g. a pruned --out) or hub id")
    _evaluation_flags(evaluate)
    _common(evaluate)

    retrain = commands.add_parser("retrain", help="AST retraining of a 2:4 model towards its dense teacher")
    retrain.add_argument("--from", dest="from_dir", default=None,
                         help="a sparsesolve prune output folder (2:4) to warm-start from; default: the teacher's "
                              "dense weights with magnitude masks (the paper's start)")
    retrain.add_argument("--teacher", default="smollm2-135m",
                         help=f"the dense model: bundled name ({', '.join(BUNDLED)}) or folder (default smollm2-135m)")
    retrain.add_argument("--out", required=True, help="output folder (a transformers folder with masks and report)")
    retrain.add_argument("--pruned", choices=["zero", "dense"], default="zero",
                         help="what pruned positions of a warm start hold: zeros, or the teacher's values (default zero)")
    retrain.add_argument("--slorb", type=int, default=0, metavar="K",
                         help="add SLoRB parameters with block size K (the paper uses 16; default 0 = off)")
    retrain.add_argument("--slorb-trainable-projection", action="store_true", help="train SLoRB's block-sum projection")
    retrain.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    retrain.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    retrain.add_argument("--device", default="cpu", help="cpu (default) or cuda (under torchrun: one GPU per rank)")
    add_config_flags(retrain, RetrainConfig, prefix="retrain_")
    _common(retrain)

    export = commands.add_parser("export", help="write a pruned model folder in a compressed format")
    export.add_argument("--model", required=True, help="a sparsesolve prune or retrain output folder")
    export.add_argument("--format", choices=["compressed", "compressed-tensors"], default="compressed",
                        help="compressed: kept values plus a packed bitmask or indices per pruned linear (safetensors, "
                             "smallest, read by sparsesolve); compressed-tensors: the layout transformers and vLLM load "
                             "(--wbits models as packed int4/int8 with group scales; others dense with sparsity metadata)")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="store every floating tensor in this dtype (default: as saved; --format compressed only)")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _common(export)
    return parser


def _say(message: str) -> None:
    print(message, flush=True)


def _prune_config(args: argparse.Namespace) -> PruneConfig:
    from sparsesolve.core.quantize import GroupQuantizer

    coordinator = config_values(args, SparseLLMConfig, prefix="sparsellm_")
    if coordinator and args.method != "sparsellm":
        flags = ", ".join("--" + name.replace("_", "-") for name in coordinator)
        raise ValueError(f"{flags} {'applies' if len(coordinator) == 1 else 'apply'} to --method sparsellm only")
    if args.wbits is not None and args.method != "sparsegpt":
        raise ValueError("--wbits (joint quantisation) needs --method sparsegpt, whose OBS pass compensates it")
    if args.sparsity is not None and ":" in args.sparsity:
        raise ValueError(f"--sparsity takes a fraction (0.7) or a percentage (70%); {args.sparsity} is an N:M pattern: "
                         f"pass --pattern {args.sparsity}")
    return PruneConfig(
        pattern=args.pattern if args.pattern is not None else args.sparsity,
        **config_values(args, PruneConfig, PRUNE_FLAGS),
        solver_options={"damp": args.damp} if args.damp is not None else {},
        quantizer=None if args.wbits is None else GroupQuantizer(args.wbits, args.groupsize),
        sparsellm=SparseLLMConfig.for_language_models(**coordinator) if coordinator else None,
    )


def _prune(args: argparse.Namespace) -> int:
    from sparsesolve.pipeline import run_prune

    evaluation = EvaluationConfig(**config_values(args, EvaluationConfig, prefix="eval_"))
    calibration = CalibrationConfig(**config_values(args, CalibrationConfig, prefix="calib_"), seq_len=evaluation.seq_len)
    run = RunConfig(args.model, _prune_config(args), calibration, evaluation, out=args.out, overwrite=args.overwrite,
                    resume=args.resume)
    run_prune(run, progress=not args.quiet, say=_say, command="sparsesolve " + " ".join(shlex.quote(a) for a in args.argv))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sparsesolve.lm.models import check_seq_len, load_model
    from sparsesolve.pipeline import evaluate_model

    evaluation = EvaluationConfig(**config_values(args, EvaluationConfig, prefix="eval_"))
    if not evaluation.corpora:
        raise ValueError("nothing to evaluate: pass --data wiki,ptb")
    model, tokenizer = load_model(args.model)
    check_seq_len(model, evaluation.seq_len)
    for name, value in evaluate_model(model, tokenizer, evaluation, progress=not args.quiet).items():
        _say(f"perplexity {name} ({evaluation.windows or 'all'} windows of {evaluation.seq_len}): {value:.2f}")
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from sparsesolve.pipeline import run_retrain

    config = RetrainConfig(**config_values(args, RetrainConfig, prefix="retrain_"))
    report = run_retrain(config, teacher=args.teacher, out=args.out, from_dir=args.from_dir, pruned=args.pruned,
                         slorb=args.slorb, slorb_trainable_projection=args.slorb_trainable_projection, device=args.device,
                         overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
    last = report["log"][-1]
    _say(f"retrained {report['steps']} steps ({last['tokens']} tokens) in {report['seconds']:.0f} s; "
         f"final loss {last['loss']:.3f}, wiki validation perplexity {last.get('wiki_validation_ppl', float('nan')):.2f}; "
         f"saved {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from sparsesolve.deploy.export import export_compressed

    if args.format == "compressed-tensors":
        if args.dtype is not None:
            raise ValueError("--dtype applies to --format compressed; compressed-tensors keeps the saved dtype")
        from sparsesolve.deploy.compressed_tensors import export_compressed_tensors

        report = export_compressed_tensors(args.model, args.out, overwrite=args.overwrite)
        quantization = report["quantization"]
        _say(f"saved {args.out}: compressed-tensors, {report['bytes']['weights'] / 2**20:.1f} MiB of weights; "
             + (f"{report['quantized_linears']} linears packed as int{quantization['bits']} with groups of "
                f"{quantization['groupsize']}" if quantization else "weights stored dense"
                + (" (on their quantisation grid; compressed-tensors packs nn.Linear only)"
                   if report["quantized_but_stored_dense"] else " (not quantised)"))
             + f"; sparsity {report['sparsity']['structure']} {report['sparsity']['global']:.1%} recorded as metadata")
        return 0

    report = export_compressed(args.model, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None,
                               overwrite=args.overwrite)
    sizes = report["bytes"]
    _say(f"saved {args.out}: {sizes['compressed'] / 2**20:.1f} MiB of weights ({report['encodings']['bitmask']} bitmask, "
         f"{report['encodings']['indices']} index-encoded linears) against {sizes['source_weights'] / 2**20:.1f} MiB "
         f"saved, {sizes['dense_float16'] / 2**20:.1f} MiB dense float16")
    return 0


def _setup(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on bad input, 130 on interruption)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    commands: dict[str, Any] = {"prune": _prune, "eval": _eval, "retrain": _retrain, "export": _export}
    try:
        _setup(args)
        return commands[args.command](args)
    except (ValueError, OSError, FloatingPointError) as error:
        text = str(error).strip()
        print(f"sparsesolve: error: {text.splitlines()[0] if text else type(error).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsesolve: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
