"""Shared fixtures: small, seeded, well-conditioned problems in float64."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from tiny_lm import save_tiny, tiny_tokenizer

from sparsesolve.lm.corpora import load_text

settings.register_profile("ci", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def correlated_inputs(n_tokens: int, width: int, seed: int, mix: float = 0.6) -> torch.Tensor:
    """``N x width`` Gaussian inputs with correlated features (``Z (I + mix G)``)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tokens, width, generator=g, dtype=torch.float64)
    return z @ (torch.eye(width, dtype=torch.float64) + mix * torch.randn(width, width, generator=g, dtype=torch.float64))


def random_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """``rows x cols`` standard Gaussian weight in float64."""
    g = torch.Generator().manual_seed(seed + 10_000)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64)


@pytest.fixture
def layer_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, X, H)`` with W 6 x 16, X 200 x 16 (H positive definite)."""
    x = correlated_inputs(200, 16, seed=1)
    return random_weight(6, 16, seed=1), x, x.T @ x


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-layer tiny Llama with a BPE tokenizer trained on the wiki corpus, saved as a model folder."""
    tokenizer = tiny_tokenizer(load_text("wiki", "train")[:100_000])
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny-llama", "llama", tokenizer, layers=6, ffn=256)
