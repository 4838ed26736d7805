"""Two processes (gloo, CPU) run the AST loop like one process with the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tiny_lm import save_tiny, tiny_tokenizer

from sparsesolve.lm.corpora import load_text
from sparsesolve.lm.models import load_model
from sparsesolve.retrain import RetrainConfig, retrain, sparse_student

CONFIG = dict(tokens=8 * 4 * 32, seq_len=32, batch_size=4, lr=3e-3, eval_every=100, eval_windows=1, mask_interval=3)


def _train(tiny: Path, out: Path) -> dict[str, torch.Tensor]:
    teacher, tokenizer = load_model(str(tiny))
    student, _ = load_model(str(tiny))
    layers = sparse_student(student, teacher, None)
    retrain(student, teacher, tokenizer, layers, RetrainConfig(**CONFIG), out, progress=False)
    return {name: (layer.weight_out_in() * layer.mask).detach().clone() for name, layer in layers.items()} | {
        f"{name}.mask": layer.mask.clone() for name, layer in layers.items()}


def _worker(rank: int, tiny: Path, out: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        state = _train(tiny, out / "ddp")
        torch.save(state, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path: Path) -> None:
    tiny = save_tiny(tmp_path / "tiny", "llama", tiny_tokenizer(load_text("wiki", "train")[:50_000]))
    mp.spawn(_worker, args=(tiny, tmp_path, _free_port()), nprocs=2, join=True)
    rank1 = torch.load(tmp_path / "rank1.pt")
    single = _train(tiny, tmp_path / "single")
    saved = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    masks = load_file(str(tmp_path / "ddp" / "masks.safetensors"))
    for name, mask in masks.items():
        assert torch.equal(rank1[f"{name}.mask"], mask)  # identical masks across ranks
        assert torch.equal(rank1[name], saved[f"{name}.weight"])  # identical weights across ranks
        # Adam divides by the root of the second moment, so where a gradient is near zero the all-reduce's
        # summation-order roundoff (1e-7 relative) grows: one element of 8192 differs by 2.6e-5 with
        # transformers 5.24 (also at the previous commit); every other is within 1e-5
        close = torch.isclose(single[name], saved[f"{name}.weight"], rtol=1e-4, atol=1e-5)
        assert int((~close).sum()) <= 2, int((~close).sum())
        torch.testing.assert_close(single[name], saved[f"{name}.weight"], rtol=1e-4, atol=1e-4)
        assert torch.equal(single[f"{name}.mask"], mask)
