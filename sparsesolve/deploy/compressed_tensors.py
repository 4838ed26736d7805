"""Export to the compressed-tensors layout (PyPI ``compressed-tensors``), which transformers and vLLM load.

For a model pruned with ``--wbits b --groupsize G`` every quantised ``nn.Linear`` ``X`` (``out x in``)
is stored as compressed-tensors' ``pack-quantized`` format writes it, from the grid its pruner
quantised it on (``quantization.safetensors``), so nothing is re-quantised:

- ``X.weight_packed`` (int32, ``out x ceil(in b / 32)``): each weight's code ``q`` in ``[0, 2^b - 1]``
  at bit ``j b`` of its row (least significant first; compressed-tensors stores the signed value
  ``q - 2^(b-1)`` offset back to ``q``, so the raw field is our code);
- ``X.weight_zero_point`` (int32, ``ceil(out b / 32) x groups``): the zero points packed the same way
  along the output dimension; ``X.weight_scale`` (float32, ``out x groups``); ``X.weight_shape``.

Decompression computes ``(q - zero) * scale`` in the scale's dtype and casts to the model's, which is
exactly how the pruned folder's weights were made (``QuantizationGrid``): the round trip is bit-exact.
The pruned zeros are codes equal to their zero point. ``config.json`` gets the ``quantization_config``
(asymmetric int, group strategy, ``dequantize: true`` so transformers loads dense linears on any
device: its compressed in-memory path does not load asymmetric packed zero points in 5.x) with a
``sparsity_config`` that records the structure (``2:4`` or ``unstructured``) and the global sparsity
as metadata (format ``dense``: compressed-tensors 0.20 no longer ships sparse compressors and vLLM
removed its 2:4 kernels). Linears without a grid (the head, routers, layers left dense) are listed in
``ignore`` and stored as they are; so are GPT-2's Conv1D modules, which compressed-tensors does not
quantise (their weights, already on the grid, are written dense and the report lists them).

An unquantised pruned model is written dense (its weights with the zeros in place) with the same
sparsity metadata and no quantisation groups; the report says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparsesolve.core.quantize import QuantizationGrid
from sparsesolve.deploy.export import copy_side_files, on_grid_codes, read_pruned
from sparsesolve.lm.output import OutputFolder

__all__ = ["CT_VERSION", "export_compressed_tensors", "pack_int32", "quantization_config"]

#: the compressed-tensors release whose layout and config classes this writer was checked against
CT_VERSION = "0.20.0"


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``rows x cols`` unsigned ``bits``-bit codes along each row into int32 words, element ``j`` at
    bits ``j bits .. j bits + bits - 1`` of the row's bit string (least significant first; a code may
    straddle two words when ``32 % bits != 0``): ``rows x ceil(cols bits / 32)``, two's complement."""
    rows, cols = codes.shape
    shifts = torch.arange(bits, dtype=torch.int64)
    bit_string = ((codes.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(rows, cols * bits)
    width = -(-cols * bits // 32)
    bit_string = torch.nn.functional.pad(bit_string, (0, width * 32 - cols * bits))
    words = (bit_string.reshape(rows, width, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _quantised_tensors(name: str, weight: torch.Tensor, mask: torch.Tensor, grid: QuantizationGrid) -> dict[str, torch.Tensor]:
    codes = on_grid_codes(weight, mask, name, grid)
    return {f"{name}.weight_packed": pack_int32(codes, grid.bits),
            f"{name}.weight_zero_point": pack_int32(grid.zero.T.contiguous(), grid.bits).T.contiguous(),
            f"{name}.weight_scale": grid.scale.float().contiguous(),
            f"{name}.weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64)}


def _structure(pattern: str | None) -> str:
    """compressed-tensors' ``sparsity_structure``: the N:M pattern (``"2:4"``), else ``"unstructured"``."""
    return pattern if pattern is not None and ":" in pattern else "unstructured"


def quantization_config(bits: int | None, groupsize: int | None, ignore: list[str], unpruned: list[str],
                        sparsity: float, structure: str) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json`` (no groups for an unquantised model):
    ``ignore`` the linears left unquantised, ``unpruned`` those the sparsity metadata does not cover."""
    groups = {} if bits is None else {"group_0": {
        "targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
        "weights": {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": groupsize,
                    "dynamic": False, "actorder": None, "observer": "minmax"}}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized" if bits else "dense",
            "quantization_status": "compressed", "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "transform_config": {}, "version": CT_VERSION, "dequantize": True,
            "sparsity_config": {"format": "dense", "global_sparsity": sparsity, "sparsity_structure": structure,
                                "targets": ["Linear"], "ignore": unpruned}}


def export_compressed_tensors(model_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the compressed-tensors folder of a pruned model folder (module docstring); returns the report
    (also saved as ``compression.json``)."""
    source = Path(model_dir)
    folder = OutputFolder(out, overwrite=overwrite)
    model, masks, grids = read_pruned(source, folder)
    if len({(g.bits, g.groupsize) for g in grids.values()}) > 1:
        raise ValueError(f"{source} mixes quantisation settings; compressed-tensors loads one per model")
    modules = dict(model.named_modules())
    for name, grid in grids.items():
        columns = modules[name].weight.shape[1] if isinstance(modules.get(name), nn.Linear) else None
        if columns is not None and columns % grid.groupsize:
            raise ValueError(f"{name} has {columns} inputs, not a multiple of the group size {grid.groupsize}: "
                             "compressed-tensors' group strategy needs whole groups; prune with another --groupsize")
    quantised = {n for n in grids if isinstance(modules.get(n), nn.Linear)}
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:          # a tied tensor (the head): transformers ties it again on load
            continue
        seen.add(tensor.data_ptr())
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and name in quantised:
            tensors.update(_quantised_tensors(name, tensor, masks[name], grids[name]))
        else:
            tensors[key] = tensor.contiguous()
    report_json = json.loads((source / "report.json").read_text()) if (source / "report.json").exists() else {}
    zeros = sum(int((~m).sum()) for m in masks.values())
    sparsity = zeros / max(1, sum(m.numel() for m in masks.values()))
    first = next(iter(grids.values()), None)
    config = quantization_config(first.bits if quantised else None, first.groupsize if quantised else None,
                                 [n for n in linears if n not in quantised] if quantised else [],
                                 [n for n in linears if n not in masks], sparsity, _structure(report_json.get("pattern")))
    folder.begin()
    copy_side_files(source, folder.staging)
    settings = json.loads((folder.staging / "config.json").read_text())
    (folder.staging / "config.json").write_text(json.dumps({**settings, "quantization_config": config}, indent=2) + "\n")
    save_file(tensors, str(folder.staging / "model.safetensors"), metadata={"format": "pt"})
    report = {"format": "compressed-tensors", "compressed_tensors_version": CT_VERSION, "source": str(source),
              "quantized_linears": len(quantised), "unquantized_linears": len(linears) - len(quantised),
              "quantized_but_stored_dense": sorted(set(grids) - quantised),
              "quantization": None if not quantised else {"bits": first.bits, "groupsize": first.groupsize},
              "sparsity": {"structure": config["sparsity_config"]["sparsity_structure"], "global": sparsity,
                           "stored": "dense (metadata only)"},
              "bytes": {"weights": (folder.staging / "model.safetensors").stat().st_size}}
    folder.write_json("compression.json", report)
    folder.finish()
    return report
