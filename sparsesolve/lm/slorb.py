"""SLoRB: extra low-rank parameters that give a pruned linear back some of its removed weight.

``y += S (P x)`` where ``P`` (``n/k x n``) sums each block of ``k`` consecutive inputs (row ``j`` of
``P`` is 1 on inputs ``jk .. jk + k - 1``) and ``S`` (``m x n/k``) is initialised to the mean of the
pruned weights of row ``i`` in block ``j``:

    S_ij = (1/k) sum_{t in block j} W_it (1 - M_it)

which is exact when the inputs are constant within each block (``sum_t W_it (1 - M_it) x_t`` with
``x_t = xbar_j``). The overhead is ``m n / k`` parameters (``+ n^2 / k`` with a trainable ``P``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

__all__ = ["SLORB_FILE", "SLoRB", "WithSLoRB", "attach_slorb", "load_slorb"]

SLORB_FILE = "slorb.safetensors"  # saved next to a retrained model's weights; metadata "k" = block size


class SLoRB(nn.Module):
    """``x -> (P x) S^T`` for a linear with ``out_features x in_features`` weight; ``k`` divides ``in``."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, k: int = 16, trainable_projection: bool = False) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if k < 1 or in_features % k:
            raise ValueError(f"SLoRB block size k={k} must divide the input width {in_features}; choose e.g. k=16")
        self.k = k
        pruned = (weight.detach() * ~mask).float()
        self.scale = nn.Parameter(pruned.reshape(out_features, in_features // k, k).mean(dim=2))
        if trainable_projection:
            blocks = torch.arange(in_features, device=weight.device) // k
            self.projection: nn.Parameter | None = nn.Parameter(
                (blocks.unsqueeze(0) == torch.arange(in_features // k, device=weight.device).unsqueeze(1)).float())
        else:
            self.projection = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(P x) S^T`` for ``x`` of shape ``(..., in_features)``."""
        if self.projection is None:
            summed = x.reshape(*x.shape[:-1], -1, self.k).sum(dim=-1)
        else:
            summed = x @ self.projection.to(x.dtype).T
        return summed @ self.scale.to(x.dtype).T

    def parameter_count(self) -> int:
        """Extra parameters (``S``, and ``P`` when trainable)."""
        return sum(p.numel() for p in self.parameters())


class WithSLoRB(nn.Module):
    """A trained linear module plus its SLoRB term: ``module(x) + slorb(x)`` (how sparsesolve loads it)."""

    def __init__(self, module: nn.Module, slorb: SLoRB) -> None:
        super().__init__()
        self.module, self.slorb = module, slorb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``module(x) + (P x) S^T``."""
        return self.module(x) + self.slorb(x)


def attach_slorb(model: nn.Module, state: dict[str, torch.Tensor], k: int) -> int:
    """Wrap every module named in ``state`` (``NAME.scale`` and optional ``NAME.projection``, as saved in
    ``slorb.safetensors``) with its SLoRB term; returns how many were attached."""
    names = sorted({key.rsplit(".", 1)[0] for key in state})
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        scale = state[f"{name}.scale"]
        slorb = SLoRB(torch.zeros(scale.shape[0], scale.shape[1] * k), torch.ones(scale.shape[0], scale.shape[1] * k,
                      dtype=torch.bool), k, trainable_projection=f"{name}.projection" in state)
        slorb.load_state_dict({key.rsplit(".", 1)[1]: value for key, value in state.items()
                               if key.rsplit(".", 1)[0] == name})
        setattr(parent, child, WithSLoRB(module, slorb.to(device=module.weight.device, dtype=module.weight.dtype)))
    return len(names)


def load_slorb(model: nn.Module, folder: str | Path) -> int:
    """Attach the SLoRB terms saved in ``FOLDER/slorb.safetensors`` (if any); returns how many."""
    path = Path(folder) / SLORB_FILE
    if not path.exists():
        return 0
    with safe_open(str(path), framework="pt") as f:
        k = int((f.metadata() or {}).get("k", 0))
        state = {key: f.get_tensor(key) for key in f.keys()}
    if k < 1:
        raise ValueError(f"{path} has no block size k in its metadata: re-save it with sparsesolve retrain")
    return attach_slorb(model, state, k)
