"""Synthetic calibration inputs shaped like transformer activations (until real layers are used)."""

from __future__ import annotations

import torch


def llm_like_inputs(n_tokens: int, width: int, seed: int, outliers: int = 8) -> torch.Tensor:
    """``N x width`` float32 inputs: correlated features with a decaying spectrum and a few outlier
    channels of 20x scale, the structure that makes Wanda and SparseGPT differ from magnitude."""
    g = torch.Generator().manual_seed(seed)
    rank = max(8, width // 4)
    basis = torch.randn(rank, width, generator=g) / rank**0.5
    spectrum = torch.logspace(0, -2, rank)
    x = (torch.randn(n_tokens, rank, generator=g) * spectrum) @ basis + 0.05 * torch.randn(n_tokens, width, generator=g)
    x[:, torch.randperm(width, generator=g)[:outliers]] *= 20
    return x
