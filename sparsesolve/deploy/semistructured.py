"""2:4 semi-structured weights for inference (``torch.sparse.to_sparse_semi_structured``, CUDA only).

``layout_report`` checks, on any device, which linears of a model can use the 2:4 kernels: the weight
must have at most 2 non-zeros in every 4 consecutive inputs of a row, be an ``nn.Linear`` (GPT-2's
``Conv1D`` multiplies by the transposed weight through ``addmm``, which the kernels do not cover), and
have a shape the backend accepts for the dtype (CUTLASS float16: rows a multiple of 32, inputs of 64).
``to_semi_structured`` converts the eligible weights in place; it needs a CUDA device, and says so.
Speed is measured by ``benchmarks/bench_semistructured.py`` on a GPU, never assumed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["is_two_four", "layout_report", "to_semi_structured"]


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive inputs of every row (``out x in``)."""
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight.reshape(rows, cols // 4, 4) != 0).sum(dim=-1) <= 2).all())


def _constraints(backend: str) -> dict:
    from torch.sparse import semi_structured

    cls = {"cutlass": semi_structured.SparseSemiStructuredTensorCUTLASS,
           "cusparselt": semi_structured.SparseSemiStructuredTensorCUSPARSELT}[backend]
    return cls._DTYPE_SHAPE_CONSTRAINTS


def layout_report(model: nn.Module, dtype: torch.dtype = torch.float16, backend: str = "cutlass") -> dict[str, Any]:
    """``{"eligible": [names], "ineligible": {name: reason}}`` over every linear-like module of ``model``."""
    if backend not in ("cutlass", "cusparselt"):
        raise ValueError(f"backend must be 'cutlass' or 'cusparselt', got {backend!r}")
    limits = _constraints(backend).get(dtype)
    if limits is None:
        raise ValueError(f"{backend} 2:4 kernels do not support {dtype}; use float16 or bfloat16")
    eligible, ineligible = [], {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or isinstance(module, nn.Embedding):
            continue
        if not isinstance(module, nn.Linear):
            ineligible[name] = f"{type(module).__name__} is not nn.Linear"
        elif not is_two_four(weight.detach()):
            ineligible[name] = "weight is not 2:4"
        elif weight.shape[0] % limits.sparse_min_rows or weight.shape[1] % limits.sparse_min_cols:
            ineligible[name] = (f"shape {tuple(weight.shape)} is not a multiple of ({limits.sparse_min_rows}, "
                                f"{limits.sparse_min_cols}) for {backend} {dtype}")
        else:
            eligible.append(name)
    return {"eligible": eligible, "ineligible": ineligible, "backend": backend, "dtype": str(dtype)}


def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.float16, backend: str = "cutlass") -> dict[str, Any]:
    """Replace every eligible weight (``layout_report``) by its semi-structured form, in place; the report."""
    report = layout_report(model, dtype, backend)
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise RuntimeError(f"2:4 kernels need a CUDA GPU (the model is on {device}); the layout is valid for "
                           f"{len(report['eligible'])} linears: move the model to CUDA in {dtype} first")
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    modules = dict(model.named_modules())
    for name in report["eligible"]:
        module = modules[name]
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach().to(dtype)), requires_grad=False)
    return report
