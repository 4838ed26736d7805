"""``sparsesolve retrain``: AST retraining from the command line (one process, or under ``torchrun``).

    sparsesolve retrain --from runs/smollm2-sparsegpt-24 --teacher smollm2-135m --tokens 200000 --out runs/ast
    sparsesolve retrain --teacher smollm2-135m --tokens 200000 --out runs/ast-paper-start   # dense + magnitude
    torchrun --nproc-per-node 2 -m sparsesolve retrain --from DIR --tokens 200000 --out DIR2

Every ``RetrainConfig`` field is an option (``--seq-len``, ``--no-distill`` ...). Under ``torchrun`` the
process group starts with gloo on CPU and nccl on CUDA; rank 0 writes the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch
import torch.distributed as dist

from sparsesolve.models import BUNDLED, load_model
from sparsesolve.output import OutputFolder
from sparsesolve.retrain.loop import RetrainConfig, retrain
from sparsesolve.retrain.start import sparse_student

__all__ = ["add_retrain_parser", "run_retrain"]


def add_retrain_parser(commands: argparse._SubParsersAction) -> None:
    """The ``retrain`` subcommand with one option per ``RetrainConfig`` field."""
    parser = commands.add_parser("retrain", help="AST retraining of a 2:4 model towards its dense teacher")
    parser.add_argument("--from", dest="from_dir", default=None,
                        help="a sparsesolve prune output folder (2:4) to warm-start from; default: the teacher's "
                             "dense weights with magnitude masks (the paper's start)")
    parser.add_argument("--teacher", default="smollm2-135m",
                        help=f"the dense model: bundled name ({', '.join(BUNDLED)}) or folder (default smollm2-135m)")
    parser.add_argument("--out", required=True, help="output folder (a transformers folder with masks and report)")
    parser.add_argument("--pruned", choices=["zero", "dense"], default="zero",
                        help="what pruned positions of a warm start hold: zeros, or the teacher's values (default zero)")
    parser.add_argument("--slorb", type=int, default=0, metavar="K",
                        help="add SLoRB parameters with block size K (the paper uses 16; default 0 = off)")
    parser.add_argument("--slorb-trainable-projection", action="store_true", help="train SLoRB's block-sum projection")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (under torchrun: one GPU per rank)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    for item in dataclasses.fields(RetrainConfig):
        flag = "--" + item.name.replace("_", "-")
        if item.type in ("bool", bool):
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=item.default,
                                help=f"{item.metadata['help']} (default {item.default})")
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(item.type).split(" ")[0], float)
            parser.add_argument(flag, dest=item.name, type=kind, default=item.default,
                                help=f"{item.metadata['help']} (default {item.default})")


def run_retrain(args: argparse.Namespace) -> int:
    """Load teacher and student, wrap, train, save; 0 on success."""
    config = RetrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RetrainConfig)})
    for name in ("tokens", "seq_len", "batch_size", "grad_accum", "mask_interval", "eval_every", "eval_windows",
                 "checkpoint_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    OutputFolder(args.out, overwrite=args.overwrite, resume=args.resume).check()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    if distributed and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        teacher, tokenizer = load_model(args.teacher, device=device)
        student, _ = load_model(args.from_dir or args.teacher, device=device)
        layers = sparse_student(student, teacher, args.from_dir, pruned=args.pruned, slorb_k=args.slorb or None,
                                slorb_trainable_projection=args.slorb_trainable_projection)
        report = retrain(student, teacher, tokenizer, layers, config, args.out, resume=args.resume,
                         overwrite=args.overwrite, progress=not args.quiet,
                         start={"from": args.from_dir or "dense + magnitude", "teacher": args.teacher,
                                "pruned": args.pruned, "slorb": args.slorb})
    finally:
        if distributed:
            dist.destroy_process_group()
    last = report["log"][-1]
    print(f"retrained {report['steps']} steps ({last['tokens']} tokens) in {report['seconds']:.0f} s; "
          f"final loss {last['loss']:.3f}, wiki validation perplexity {last.get('wiki_validation_ppl', float('nan')):.2f}; "
          f"saved {args.out}", flush=True)
    return 0
