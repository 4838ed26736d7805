"""2:4 inference through torchao (the ``torchao`` extra): ``to_torchao(model, scheme)``.

Schemes, and the torchao releases that still ship them (read from the releases' sources):

- ``semi-sparse``: float16/bfloat16 weights as torch's semi-structured tensors (``SemiSparseWeightConfig``;
  cuSPARSELt or CUTLASS under the hood), torchao 0.15 to 0.18.
- ``int8-2:4``: int8 dynamic activations with int8 2:4 weights (``Int8DynamicActivationInt8WeightConfig``
  with ``SemiSparseLayout``), torchao 0.15 and 0.16 (the layout was removed in 0.17).
- ``int4-2:4``: int4 weight-only in the 2:4 Marlin layout (``Int4WeightOnlyConfig`` with packing
  format ``marlin_sparse``), torchao 0.15 only (removed in 0.16).

All three need a CUDA GPU of compute capability 8.0 or newer. On any other device, with a torchao
outside a scheme's range, or with no linear in the 2:4 layout, ``to_torchao`` refuses with a one-line
``ValueError`` that says what to do instead, before it changes anything. Measured on one H100 (torch
2.11, CUDA 13): the default CUTLASS semi-structured path fails on compute capability 9.0, and cuSPARSELt
linears ran 2x to 30x slower than dense float16 (about 0.8 ms per call). The conversion itself is
not tested here (no GPU in CI); the refusals and the version gate are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsesolve.deploy.semistructured import layout_report

__all__ = ["SCHEMES", "TORCHAO_RANGE", "check_torchao_version", "to_torchao"]

#: the torchao releases this module was written against (the ``torchao`` extra's range)
TORCHAO_RANGE = ((0, 15), (0, 19))


@dataclass(frozen=True)
class Scheme:
    """A torchao 2:4 path: the torchao releases that have it (``first`` included, ``last`` excluded)."""

    first: tuple[int, int]
    last: tuple[int, int]
    what: str


SCHEMES = {
    "semi-sparse": Scheme((0, 15), (0, 19), "float16/bfloat16 2:4 weights (semi-structured tensors)"),
    "int8-2:4": Scheme((0, 15), (0, 17), "int8 dynamic activations, int8 2:4 weights"),
    "int4-2:4": Scheme((0, 15), (0, 16), "int4 weight-only, 2:4 Marlin layout"),
}


def _release(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def check_torchao_version(version: str, scheme: str) -> None:
    """One-line ``ValueError`` unless torchao ``version`` ships ``scheme``."""
    wanted = SCHEMES[scheme]
    found = _release(version)
    if not wanted.first <= found < wanted.last:
        first, last = (".".join(map(str, v)) for v in (wanted.first, wanted.last))
        raise ValueError(f"scheme {scheme!r} ({wanted.what}) needs torchao >= {first} and < {last}; torchao {version} "
                         f"is installed: pip install 'torchao>={first},<{last}'")


def to_torchao(model: nn.Module, scheme: str = "semi-sparse", *, group_size: int = 128) -> dict[str, Any]:
    """Convert every linear of ``model`` that is 2:4 (``layout_report``) with torchao's ``scheme``, in
    place; returns ``{"scheme", "torchao", "capability", "converted", "skipped"}``. ``group_size``: the
    int4 scheme's quantisation groups. Refusals: module docstring."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"torchao's 2:4 paths run on CUDA GPUs of compute capability 8.0 or newer; the model is on "
                         f"{device}: on a CPU keep the pruned dense weights (or export --format compressed-tensors)")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        raise ValueError(f"torchao's 2:4 kernels need compute capability 8.0 or newer; this GPU has "
                         f"{capability[0]}.{capability[1]}")
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"torchao's 2:4 kernels take float16 or bfloat16 weights; the model is {dtype}: "
                         "convert it first (model.half() or model.to(torch.bfloat16))")
    report = layout_report(model, dtype, "cusparselt")
    if not report["eligible"]:
        raise ValueError("no linear of the model is in the 2:4 layout: prune with --pattern 2:4 first")
    import torchao

    check_torchao_version(torchao.__version__, scheme)
    eligible = set(report["eligible"])

    def chosen(module: nn.Module, name: str) -> bool:
        return name in eligible

    if scheme == "semi-sparse":
        from torchao.sparsity import SemiSparseWeightConfig, sparsify_

        sparsify_(model, SemiSparseWeightConfig(), filter_fn=chosen)
    else:
        from torchao.quantization import quantize_

        if scheme == "int8-2:4":
            from torchao.dtypes import SemiSparseLayout
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig

            config = Int8DynamicActivationInt8WeightConfig(layout=SemiSparseLayout())
        else:
            from torchao.quantization import Int4WeightOnlyConfig

            config = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="marlin_sparse")
        quantize_(model, config, filter_fn=chosen)
    return {"scheme": scheme, "torchao": torchao.__version__, "capability": list(capability),
            "converted": report["eligible"], "skipped": report["ineligible"]}
