"""AdamW with the masked decay's update form (``decay.py``): the decay term in the second moment and
the normalised update, not in the first moment.

For a parameter ``W`` with loss gradient ``g`` and decay term ``d`` (zero for parameters without one),
step ``t`` with learning rate ``lr`` and decoupled weight decay ``wd``::

    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) (g + d)^2
    W <- W (1 - lr wd) - lr (m / (1 - b1^t) + d) / (sqrt(v / (1 - b2^t)) + eps)

With ``d = 0`` this is exactly ``torch.optim.AdamW``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["MaskedAdamW"]


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW whose ``step(decay=...)`` takes per-parameter decay terms (module docstring)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"MaskedAdamW needs lr >= 0, eps > 0, betas in [0, 1), weight_decay >= 0; "
                             f"got {lr}, {eps}, {betas}, {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None,  # type: ignore[override]
             decay: dict[torch.Tensor, Callable[[], torch.Tensor]] | None = None) -> None:
        """One AdamW step; ``decay`` maps parameters to functions giving their decay terms ``d`` (same
        shape), called when the step reaches the parameter."""
        if closure is not None:
            raise ValueError("MaskedAdamW does not take a closure")
        decay = decay or {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                g = p.grad
                d = decay[p]() if p in decay else None
                state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                second = g if d is None else g + d
                state["exp_avg_sq"].mul_(beta2).addcmul_(second, second, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
                numerator = state["exp_avg"] / (1 - beta1**t)
                if d is not None:
                    numerator = numerator + d
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(numerator, denom, value=-group["lr"])
