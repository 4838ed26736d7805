"""``RetrainConfig``: the settings of one AST retraining run, validated at construction (no torch import)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from sparsesolve.core.config import option

__all__ = ["DEFAULT_LAMBDA", "RetrainConfig"]

DEFAULT_LAMBDA = {"gradient": 6e-5, "update": 1e-4}  # the paper's lambda_max for the two decay forms


@dataclass(frozen=True)
class RetrainConfig:
    """Hyperparameters of one retraining run: the paper's GPT-2 recipe, scaled to a CPU budget.

    Every field is a ``sparsesolve retrain`` option (``--seq-len`` for ``seq_len``) with this help text.
    """

    tokens: int = option(1_000_000, "training tokens seen, all ranks together")
    seq_len: int = option(256, "tokens per training window")
    batch_size: int = option(8, "windows per optimiser step, all ranks and micro-batches together")
    grad_accum: int = option(1, "micro-batches per step on each rank")
    lr: float = option(2e-4, "peak learning rate (the paper's GPT-2 run)")
    min_lr_ratio: float = option(0.1, "the cosine ends at lr x this")
    warmup: float = option(0.05, "fraction of the steps with linear warmup")
    weight_decay: float = option(0.1, "AdamW weight decay of the matrices")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "gradient norm clip")
    mask_interval: int = option(10, "steps between mask refreshes (the paper's delta t)")
    fixed_mask_steps: int = option(0, "keep the starting (one-shot) mask this many steps")
    fixed_mask: bool = option(False, "never refresh the mask")
    decay: str = option("update", "masked decay form: update (in Adam's normalised update and second moment, not its "
                                   "momentum: the paper's) or gradient (added to the gradient: SR-STE's)")
    lambda_max: float | None = option(None, "final masked decay; default 6e-5 (gradient form) or 1e-4 (update form)")
    decay_warmup: float = option(0.25, "fraction of the steps over which the decay ramps up (T0)")
    distill: bool = option(True, "distil from the dense teacher (else the language-model loss alone)")
    alpha_kd: float = option(0.67, "weight of the distillation term")
    temperature: float = option(2.0, "distillation temperature")
    dtype: str = option("float32", "float32, or bfloat16 (autocast forward passes; master weights stay float32)")
    eval_every: int = option(50, "steps between wiki validation perplexities")
    eval_windows: int = option(16, "validation windows of seq_len tokens")
    checkpoint_every: int = option(50, "steps between checkpoints (--resume continues from the last)")
    seed: int = option(0, "seed of the training windows")
    on_nonfinite: str = option("stop", "a non-finite loss or gradient norm: stop (one-line error) or skip the step")

    @property
    def steps(self) -> int:
        """Optimiser steps of the budget."""
        return max(1, self.tokens // (self.batch_size * self.seq_len))

    def __post_init__(self) -> None:
        for name in ("tokens", "seq_len", "batch_size", "grad_accum", "mask_interval", "eval_every", "eval_windows",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decay not in DEFAULT_LAMBDA:
            raise ValueError(f"decay must be 'gradient' or 'update', got {self.decay!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    def check(self, world: int) -> None:
        """One-line error when the batch cannot be split over ``world`` ranks."""
        if self.batch_size % (world * self.grad_accum):
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of ranks x grad_accum = "
                             f"{world} x {self.grad_accum}")

    def lr_at(self, step: int) -> float:
        """Linear warmup over ``warmup * steps``, then cosine to ``min_lr_ratio * lr``."""
        warm = max(1, round(self.warmup * self.steps))
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, self.steps - warm))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (reports, checkpoints)."""
        return asdict(self)
