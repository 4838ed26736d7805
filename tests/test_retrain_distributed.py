"""Two processes (gloo, CPU) run the AST loop like one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import torch
from gloo import gloo_rank, spawn
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


def _worker(rank: int, port: int, tiny: Path, out: Path) -> None:
    with gloo_rank(rank, port):
        torch.save(_train(tiny, out / "ddp"), out / f"rank{rank}.pt")


def test_two_processes_match_one_process(tmp_path: Path) -> None:
    tiny = save_tiny(tmp_path / "tiny", "llama", tiny_tokenizer(load_text("wiki", "train")[:50_000]))
    spawn(_worker, tiny, tmp_path)
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
